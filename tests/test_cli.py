"""The ``kelix-fast`` command as a user runs it (a subprocess): every command that computes, on the tiny
models or on tiny checkpoints written as the release is laid out, and the help of every command.
Errors are tests/test_cli_errors.py."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import kelix_fast
from kelix_fast import cli, cli_parser, presets
from kelix_fast.processor import KelixTextTokenizer

# Tiny tensors: torch's intra-op threads cost more than they save (tests/conftest.py).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DEMO = ("demo", "--device", "cpu", "--steps", "2", "--size", "64", "--blocks", "3")
DEMO_BARS = ("answer blocks", "image blocks", "DiT steps")


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m kelix_fast.cli ARGS`` with stdout and stderr captured (so not on a terminal)."""
    command = [sys.executable, "-m", "kelix_fast.cli", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False, cwd=cwd, env=ENV
    )


def run_on_a_terminal(*args: str, cwd: Path) -> tuple[int, str, str]:
    """The command with its stderr on a pseudo-terminal of 100 columns, as a user at a terminal sees
    it (progress bars included), and its stdout on a pipe: (status, stdout, stderr)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    command = [sys.executable, "-m", "kelix_fast.cli", *args]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=slave, text=True, cwd=cwd, env=ENV
    )
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:  # the terminal's buffer is small: read it while the command runs
        while True:
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: the command closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    stdout, _ = process.communicate(timeout=300)
    reader.join()
    os.close(master)
    return process.returncode, stdout, b"".join(chunks).decode()


def write_image(path: Path) -> Path:
    Image.new("RGB", (84, 56), (200, 30, 30)).save(path)
    return path


def _write_dit(folder: Path, dit: torch.nn.Module) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dit.config.to_dict()))
    save_file(
        {k: v.contiguous() for k, v in dit.state_dict().items()}, folder / "model.safetensors"
    )
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The tiny models written as the release's folders: Kelix-SFT, Kelix-DiT, Kelix-AEDIT, the DC-AE."""
    root = tmp_path_factory.mktemp("checkpoints")
    config, place = presets.tiny_config(), {"device": "cpu", "dtype": torch.float32}
    sft = root / "Kelix-SFT"
    presets.write_checkpoint(sft, config, presets.random_weights(config, 1))
    KelixTextTokenizer.tiny().backend.save(str(sft / "tokenizer.json"))
    (sft / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136}))
    presets.tiny_vae(1, **place).save_pretrained(root / "vae")
    return {
        "ar": sft,
        "dit": _write_dit(root / "Kelix-DiT", presets.tiny_dit(1, **place)),
        "aedit": _write_dit(root / "Kelix-AEDIT", presets.tiny_aedit(1, **place)),
        "vae": root / "vae",
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str, str]:
    """One demo run at a terminal, without -o, in a fresh folder: (folder, stdout, stderr)."""
    folder = tmp_path_factory.mktemp("demo")
    status, stdout, stderr = run_on_a_terminal(*DEMO, cwd=folder)
    assert status == 0, stdout + stderr
    return folder, stdout, stderr


def test_the_demo_writes_its_png_where_it_runs_and_names_it(demo):
    folder, stdout, _ = demo
    assert "visual blocks of 8 ids" in stdout
    assert "text to image, per stage" in stdout and "vae" in stdout
    written = folder / "kelix_demo.png"
    assert f"written {written} (64x64)" in stdout
    with Image.open(written) as image:
        assert image.format == "PNG" and image.size == (64, 64)


def test_the_demo_shows_progress_bars_and_no_warning(demo):
    _, _, stderr = demo
    segments = [s.strip() for s in stderr.replace("\n", "\r").split("\r") if s.strip()]
    bars = {desc for desc in DEMO_BARS for s in segments if s.startswith(f"{desc}:")}
    assert bars == set(DEMO_BARS), stderr
    others = [s for s in segments if not s.startswith(tuple(f"{d}:" for d in DEMO_BARS))]
    assert others == [], stderr  # a bar is all the demo writes to stderr: no warning, no log


def test_generate_chat_and_reconstruct_load_the_checkpoint_folders(checkpoints, tmp_path):
    ar, dit, vae, aedit = (str(checkpoints[k]) for k in ("ar", "dit", "vae", "aedit"))
    picture = tmp_path / "fox.png"
    generated = run_cli(
        "generate", "--device", "cpu", "--ar", ar, "--dit", dit, "--vae", vae, "--steps", "2",
        "--size", "64", "--seed", "3", "-o", str(picture), "a fox",
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    assert f"written {picture} (64x64)" in generated.stdout and "Traceback" not in generated.stderr
    photo = write_image(tmp_path / "in.png")
    answered = run_cli(
        "chat", "--device", "cpu", "--ar", ar, "--image", str(photo), "--max-new-tokens", "4",
        "--top-k", "0", "--top-p", "0.9", "--temperature", "0.8", "--seed", "5", "What is it?",
    )  # fmt: skip
    assert answered.returncode == 0, answered.stderr
    assert "per stage:" in answered.stdout and answered.stderr == ""
    copy = tmp_path / "copy.png"
    rebuilt = run_cli(
        "reconstruct", "--device", "cpu", "--ar", ar, "--aedit", aedit, "--vae", vae,
        "--steps", "2", "--size", "64", "--fusion", "sum", str(photo), "-o", str(copy),
    )  # fmt: skip
    assert rebuilt.returncode == 0, rebuilt.stderr
    with Image.open(picture) as first, Image.open(copy) as second:
        assert first.size == second.size == (64, 64)


def test_reconstruct_tiny_writes_a_png_and_nothing_to_stderr_off_a_terminal(tmp_path):
    photo = write_image(tmp_path / "in.png")
    result = run_cli(
        "reconstruct", "--tiny", "--device", "cpu", "--steps", "2", "--size", "64", photo.name,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bars in a pipe or a log file
    written = tmp_path / "kelix_reconstruction.png"
    assert f"written {written} (64x64)" in result.stdout
    with Image.open(written) as image:
        assert image.format == "PNG" and image.size == (64, 64)


def test_bench_runs_the_harness_from_any_folder(tmp_path):
    (tmp_path / "benchmarks").mkdir()  # a folder of that name where the user is must not matter
    result = run_cli(
        "bench", "run", "--suite", "kernels", "--cpu", "--quick", "--cases", "block_embed",
        "--json", "smoke.json", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "smoke.json").read_text())  # relative to where it ran
    assert report["device"] == "cpu" and report["results"]


def test_bench_outside_a_source_checkout_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kelix_fast, "__file__", str(tmp_path / "kelix_fast" / "__init__.py"))
    assert cli.main(["bench", "pass", "--cpu", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "kelix-fast: error: bench runs the benchmark harness of a source checkout"
    )
    assert err.count("\n") == 1


def test_info_reports_backends(capsys):
    assert cli.main(["info"]) == 0
    assert "block_embed backend (auto, CPU): torch" in capsys.readouterr().out


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices


def test_every_option_says_what_it_does_and_its_default():
    commands = _commands(cli_parser.build_parser())
    assert set(commands) == {
        "demo", "generate", "chat", "reconstruct", "bench", "serve", "info"
    }  # fmt: skip
    for name, parser in commands.items():
        # One of --ar and --tiny must be given: neither has a default.
        one_of = {
            a for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions
        }
        for action in parser._actions:
            assert action.help, f"{name} {action.dest} has no help"
            takes_value = action.option_strings and action.nargs != 0
            optional = not action.required and action not in one_of
            if takes_value and optional and action.default in (None, []):
                # No value as default: the help says what happens without the option, or when it
                # is needed.
                assert "(default: " in action.help or "needed with" in action.help, (
                    f"{name} {action.dest}: {action.help}"
                )


@pytest.mark.parametrize(
    "command, shown",
    [
        ("demo", ["(default: kelix_demo.png)", "(default: 4)", "(default: 128)"]),
        ("generate", ["(default: kelix.png)", "(default: 50)", "(default: 1024)", "no --top-k"]),
        ("chat", ["(default: 256)", "(default: 1)", "(default: 1.0)", "{reference,exact}"]),
        ("reconstruct", ["(default: 20)", "(default: 4.5)", "(default: mean)", "{sum,mean}"]),
        ("bench", ["kelix-fast bench run --suite kernels --cpu --quick", "{run,pass}"]),
        ("serve", ["(default: 127.0.0.1)", "(default: 8000)", "(default: 32)"]),
    ],
)
def test_help_shows_choices_and_defaults(command, shown, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    for text in shown:
        assert text in out, f"{command} --help lacks {text!r}"


def test_the_top_level_help_lists_every_command_and_the_exit_statuses(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in _commands(cli_parser.build_parser()):
        assert f"    {command} " in out
    assert "2 a usage error" in out
