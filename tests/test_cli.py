"""The ``kelix-fast`` command: the README's first-run demo and ``info``."""

from __future__ import annotations

from kelix_fast import cli


def test_demo_runs_end_to_end(capsys):
    assert cli.main(["demo", "--blocks", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "visual blocks of 8 ids" in out
    assert "generated 3 blocks" in out
    assert "block  2" in out


def test_info_reports_backends(capsys):
    assert cli.main(["info"]) == 0
    assert "block_embed backend (auto, CPU): torch" in capsys.readouterr().out
