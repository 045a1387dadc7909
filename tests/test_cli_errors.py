"""How the ``kelix-fast`` command fails: a user error is one line on stderr and no traceback, exit status
2 for a usage error (nothing computed), 1 for a failure of the run, 130 when interrupted; ``--debug``
shows the traceback instead."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from kelix_fast import cli

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny tensors (tests/conftest.py)
RECONSTRUCT = ("reconstruct", "--tiny", "--device", "cpu", "--steps", "2", "--size", "64")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m kelix_fast.cli ARGS``, output captured."""
    command = [sys.executable, "-m", "kelix_fast.cli", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False, env=ENV
    )


def one_line(stderr: str) -> str:
    """The single line of ``stderr``, which must hold exactly one and no traceback."""
    assert "Traceback" not in stderr, stderr
    assert stderr.count("\n") == 1 and stderr.endswith("\n"), stderr
    return stderr.rstrip("\n")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (84, 56), (10, 120, 200)).save(folder / "in.png")
    (folder / "a_file").write_text("")
    return {"image": str(folder / "in.png"), "file": str(folder / "a_file"), "dir": str(folder)}


MODEL_DIRS = ["--ar", "{dir}", "--dit", "{dir}", "--vae", "{dir}"]
USAGE_ERRORS = [
    ([], "the following arguments are required: COMMAND"),
    (["demo", "--device", "cpu", "--bogus"], "unrecognized arguments: --bogus"),
    (["demo", "--device", "cpu", "--vq", "nope"], "argument --vq: invalid choice: 'nope'"),
    (["demo", "--device", "cpu", "--steps", "0"], "argument --steps: expected an integer >= 1"),
    (["demo", "--device", "cpu", "--size", "100"], "must be a multiple of 32 pixels, got 100"),
    (["demo", "--device", "cpu", "-o", "{file}/x.png"], "is not a folder"),
    (["demo", "--device", "cpu", "-o", "{dir}/x.txt"], "does not end in an image extension"),
    (["chat", "--device", "cpu", "--ar", "/nonexistent", "q"], "no such directory: /nonexistent"),
    (
        ["chat", "--device", "cpu", "--ar", "{dir}", "--max-new-tokens", "0", "q"],
        "argument --max-new-tokens: expected an integer >= 1, got 0",
    ),
    (
        ["chat", "--device", "cpu", "--ar", "{dir}", "--top-p", "1.5", "q"],
        "argument --top-p: expected a number in (0, 1], got '1.5'",
    ),
    (
        ["generate", "--device", "cpu", *MODEL_DIRS, "--dtype", "int8", "x"],
        "argument --dtype: invalid choice: 'int8'",
    ),
    (["reconstruct", "--tiny", "--device", "cpu", "/nonexistent.png"], "no such file"),
    (["bench"], "the following arguments are required: {run,pass}"),
    # Found by kelix_fast after parsing, before any model runs:
    (["demo", "--device", "nonsense"], "device must name a torch device"),
    (["chat", "--device", "cpu", "--ar", "{dir}", "q"], "no config.json"),
    (
        ["reconstruct", "--device", "cpu", "--ar", "{dir}", "{image}"],
        "reconstruct --ar needs --aedit and --vae",
    ),
]


@pytest.mark.parametrize(
    "argv, message",
    USAGE_ERRORS,
    ids=[message for _, message in USAGE_ERRORS],
)
def test_a_usage_error_is_one_line_and_status_2(files, argv, message):
    result = run_cli(*(arg.format(**files) for arg in argv))
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert line.startswith("kelix-fast: error: ") and message in line, line
    assert result.stdout == ""


@pytest.fixture
def full_disk(tmp_path) -> Path:
    """An output file whose writes fail as on a full disk, found only when the image is saved."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    path = tmp_path / "out.png"
    path.symlink_to("/dev/full")
    return path


def test_a_failure_of_the_run_is_one_line_and_status_1(files, full_disk):
    result = run_cli(*RECONSTRUCT, files["image"], "-o", str(full_disk))
    assert result.returncode == 1, result.stderr
    assert one_line(result.stderr) == (
        f"kelix-fast: reconstruct failed: OSError: cannot write {full_disk}: No space left on device "
        "(run with --debug for the traceback)"
    )


def test_debug_shows_the_traceback(files, full_disk):
    result = run_cli("--debug", *RECONSTRUCT, files["image"], "-o", str(full_disk))
    assert result.returncode == 1
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert "OSError: cannot write" in result.stderr and "--debug" not in result.stderr


# The console script pip installs beside this interpreter (or on PATH).
SCRIPT = shutil.which("kelix-fast", path=os.path.dirname(sys.executable)) or shutil.which(
    "kelix-fast"
)


@pytest.mark.skipif(SCRIPT is None, reason="the kelix-fast script is not installed")
def test_the_installed_script_exits_with_the_status():
    result = subprocess.run(
        [SCRIPT, "demo", "--device", "cpu", "--blocks", "0"],
        capture_output=True, text=True, timeout=120, check=False, env=ENV,
    )  # fmt: skip
    assert result.returncode == 2
    assert "argument --blocks" in one_line(result.stderr)


# In process, the command replaced by one that raises: how each kind of error is reported.


@pytest.mark.parametrize(
    "error, status, line",
    [
        (
            torch.OutOfMemoryError("CUDA out of memory.\nTried to allocate 2.00 GiB"),
            1,
            (
                "kelix-fast: demo failed: OutOfMemoryError: CUDA out of memory. Tried to allocate "
                "2.00 GiB (run with --debug for the traceback)"
            ),
        ),
        (RuntimeError(), 1, "kelix-fast: demo failed: RuntimeError (run with --debug"),
        (KeyError("vae"), 1, "kelix-fast: demo failed: KeyError: 'vae' (run with"),
        (ValueError("generate_image: steps must be >= 1"), 2, "kelix-fast: error: generate_image"),
        (FileNotFoundError("no model.safetensors"), 2, "kelix-fast: error: no model.safetensors"),
        (KeyboardInterrupt(), 130, "kelix-fast: interrupted"),
    ],
)
def test_each_kind_of_error_has_its_status(monkeypatch, capsys, error, status, line):
    def fails(_):
        raise error

    monkeypatch.setattr(cli, "demo", fails)
    assert cli.main(["demo", "--device", "cpu"]) == status
    captured = capsys.readouterr()
    assert one_line(captured.err).startswith(line)
    assert cli.main(["demo", "--device", "cpu", "--debug"]) == status
    assert "Traceback" in capsys.readouterr().err
