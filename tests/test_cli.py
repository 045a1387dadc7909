"""The ``kelix-fast`` command as a user runs it (a subprocess), and its argument checks."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from kelix_fast import cli


def test_demo_writes_a_png_and_a_timing_table(tmp_path):
    out = tmp_path / "demo.png"
    result = subprocess.run(
        [sys.executable, "-m", "kelix_fast.cli", "demo", "--device", "cpu", "--steps", "2",
         "--size", "64", "--blocks", "3", "-o", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "visual blocks of 8 ids" in result.stdout
    assert "text to image, per stage" in result.stdout and "vae" in result.stdout
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (64, 64)


def test_info_reports_backends(capsys):
    assert cli.main(["info"]) == 0
    assert "block_embed backend (auto, CPU): torch" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["generate", "--ar", "/nonexistent", "--dit", ".", "--vae", ".", "x"],
            "no such directory: /nonexistent",
        ),
        (
            ["chat", "--ar", ".", "--image", "/nonexistent.png", "q"],
            "no such file: /nonexistent.png",
        ),
        (
            ["generate", "--ar", ".", "--dit", ".", "--vae", ".", "--dtype", "int8", "x"],
            "dtype must be one of",
        ),
    ],
)
def test_bad_paths_and_options_are_refused(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
