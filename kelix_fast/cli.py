"""The ``kelix-fast`` command: ``demo`` (the embedded tiny models, no files), ``generate`` (text to
image), ``chat`` (image understanding), ``reconstruct`` (an image through Kelix-Tok and Kelix-AEDIT),
``bench`` (the benchmark harness of a source checkout), ``serve`` (the OpenAI-compatible HTTP server) and
``info``. The only module that prints or reads the environment; the options of every command
and the checks of their values are kelix_fast.cli_parser.

A user error never shows a traceback: it is one line on stderr and an exit status, 2 for a usage error
(found before any model runs), 1 for a command that failed while running, 130 when interrupted;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

import kelix_fast
from kelix_fast import ops
from kelix_fast.cli_parser import (
    DTYPES,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PROG,
    build_parser,
)
from kelix_fast.options import EngineOptions
from kelix_fast.pipeline import KelixPipeline


class UsageError(Exception):
    """A user error a command finds after parsing (a combination of options): exit status 2."""


# kelix_fast checks every argument of a call before any model runs and raises these for a bad one (naming
# it), so they are usage errors; a file Pillow cannot read is one too. Everything else is a failure of the
# run (exit 1). A bug that surfaces as one of these still shows its traceback under --debug.
USAGE_ERRORS = (UsageError, ValueError, TypeError, FileNotFoundError, UnidentifiedImageError)


# ---------------------------------------------------------------------------------- shared pieces


def _synthetic_image(height: int, width: int) -> torch.Tensor:
    """A deterministic colour gradient [H, W, 3] uint8."""
    rows = torch.linspace(0, 255, height)[:, None].expand(height, width)
    cols = torch.linspace(0, 255, width)[None, :].expand(height, width)
    return torch.stack([rows, cols, (rows + cols) / 2], dim=-1).round().to(torch.uint8)


def _print_timings(title: str, timings: dict[str, float]) -> None:
    print(f"{title}:")
    for stage, seconds in timings.items():
        print(f"  {stage:<11} {seconds * 1e3:9.1f} ms")
    print(f"  {'total':<11} {sum(timings.values()) * 1e3:9.1f} ms")


def _progress() -> bool:
    """Progress bars on a terminal only: they redraw in place there, but in a log file or a pipe they
    would be a stream of carriage-return lines mixed with the messages."""
    return sys.stderr.isatty()


def _dtype(args: argparse.Namespace) -> torch.dtype | None:
    return None if args.dtype is None else DTYPES[args.dtype]


def _options(args: argparse.Namespace) -> EngineOptions:
    graphs = {"auto": None, "on": True, "off": False}[args.cuda_graphs]
    return EngineOptions(
        vq=args.vq,
        scoring=args.scoring,
        sampler=args.sampler,
        cuda_graphs=graphs,
        backends=dict(args.backend),
    )


def _rendering(args: argparse.Namespace) -> dict[str, object]:
    """The rendering options (``cli_parser._add_rendering``) as ``generate_image``/``reconstruct``
    take them."""
    return {
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "seed": args.seed,
        "size": args.size,
        "progress": _progress(),
    }


def _save(image: Image.Image, path: str) -> str:
    """Save ``image``; the line that names the file as the user can find it. ``-o`` was checked before
    the run, so a failure here (a full disk, a folder that refuses the file) is a failure of the run,
    never a usage error, whatever its kind of OSError."""
    try:
        image.save(path)
    except OSError as error:
        raise OSError(f"cannot write {path}: {error.strerror or error}") from error
    return f"written {os.path.abspath(path)} ({image.size[0]}x{image.size[1]})"


@contextlib.contextmanager
def _expected_unclosed_image() -> Iterator[list[logging.LogRecord]]:
    """Hold back, and collect, the warning of the official fallback for an image that was never closed
    (kelix_fast.runtime.conditioning). The tiny models' random weights never emit ``<|vision_end|>``,
    so in the demo that fallback is the normal path, not something to warn about; every other record
    passes."""
    held: list[logging.LogRecord] = []

    def keep(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "<|vision_end|>" in message and "official fallback" in message:
            held.append(record)
            return False
        return True

    logger = logging.getLogger("kelix_fast.runtime.conditioning")
    logger.addFilter(keep)
    try:
        yield held
    finally:
        logger.removeFilter(keep)


# ---------------------------------------------------------------------------------- commands


def demo(args: argparse.Namespace) -> int:
    """The embedded tiny models: an image through Kelix-Tok, a chat answer, text to image."""
    start = time.perf_counter()
    pipe = KelixPipeline.tiny(
        seed=args.seed, device=args.device, dtype=_dtype(args), options=_options(args)
    )
    ar = pipe.ar
    print(
        f"kelix_fast {kelix_fast.__version__}: tiny Kelix (random weights, seed {args.seed}) on "
        f"{ar.device}, {str(ar.dtype).removeprefix('torch.')}, AR resident "
        f"{ar.resident_bytes() / 1e6:.1f} MB, built in {time.perf_counter() - start:.2f} s"
    )
    image = _synthetic_image(56, 84)
    ids = pipe.tokenize_image(image)
    print(
        f"Kelix-Tok: 56x84 image -> {ids.shape[0]} visual blocks of 8 ids; first {ids[0].tolist()}"
    )
    answer = pipe.chat(
        (image, "What is in this picture?"), max_new_tokens=args.blocks, progress=_progress()
    )
    print(f"chat (random weights, so no meaning): {answer!r}")
    _print_timings("image understanding, per stage", pipe.timings)
    with _expected_unclosed_image() as unclosed:
        picture = pipe.generate_image(
            "a watercolor fox",
            steps=args.steps,
            size=args.size,
            seed=args.seed,
            progress=_progress(),
        )
    print(f"text to image: {_save(picture, args.output)}")
    if unclosed:
        print(
            "  (random weights never close the image blocks: conditioned on the official fallback)"
        )
    _print_timings("text to image, per stage", pipe.timings)
    return 0


def generate(args: argparse.Namespace) -> int:
    """Text to image with the official checkpoints."""
    pipe = KelixPipeline.from_pretrained(
        args.ar,
        args.dit,
        args.vae,
        device=args.device,
        dtype=_dtype(args),
        model_max_length=args.max_condition_length,
        options=_options(args),
    )
    image = pipe.generate_image(args.prompt, **_rendering(args))
    print(_save(image, args.output))
    _print_timings("per stage", pipe.timings)
    return 0


def chat(args: argparse.Namespace) -> int:
    """Answer one question, about an image when one is given."""
    pipe = KelixPipeline.from_pretrained(
        args.ar, device=args.device, dtype=_dtype(args), options=_options(args)
    )
    if args.image is None:
        messages = [{"role": "user", "content": args.question}]
    else:
        messages = (args.image, args.question)
    answer = pipe.chat(
        messages,
        max_new_tokens=args.max_new_tokens,
        top_k=args.top_k,
        top_p=args.top_p,
        temperature=args.temperature,
        seed=args.seed,
        progress=_progress(),
    )
    print(answer)
    _print_timings("per stage", pipe.timings)
    return 0


def reconstruct(args: argparse.Namespace) -> int:
    """An image through Kelix-Tok codes and Kelix-AEDIT back to pixels."""
    pipe = _reconstruction_pipeline(args)
    image = pipe.reconstruct(
        args.image,
        fusion=args.fusion,
        schedule=args.schedule,
        max_pixels=args.max_pixels,
        **_rendering(args),
    )
    print(_save(image, args.output))
    _print_timings("per stage", pipe.timings)
    return 0


def _reconstruction_pipeline(args: argparse.Namespace) -> KelixPipeline:
    """The tiny models (``--tiny``), or Kelix-SFT's tokenizer with Kelix-AEDIT and the DC-AE."""
    place = {"device": args.device, "dtype": _dtype(args), "options": _options(args)}
    if args.tiny:
        if args.aedit is not None or args.vae is not None:
            raise UsageError(
                "reconstruct --tiny has its own AEDIT and VAE: leave out --aedit/--vae"
            )
        return KelixPipeline.tiny(args.seed, **place)
    if args.aedit is None or args.vae is None:
        raise UsageError("reconstruct --ar needs --aedit and --vae (Kelix-AEDIT and the DC-AE)")
    return KelixPipeline.from_pretrained(args.ar, vae_path=args.vae, aedit_path=args.aedit, **place)


def bench(args: argparse.Namespace) -> int:
    """``python -m benchmarks`` of the source checkout this kelix_fast comes from; its exit status."""
    root = Path(kelix_fast.__file__).resolve().parent.parent
    if not (root / "benchmarks" / "__main__.py").is_file():
        raise UsageError(
            f"bench runs the benchmark harness of a source checkout (benchmarks/ beside kelix_fast/), "
            f"and there is none in {root}: clone the repository and pip install -e . there"
        )
    # The harness is found through PYTHONPATH, and -P keeps the current folder off sys.path: the
    # command runs where the user is (so relative --json and --out paths mean what they typed), and a
    # folder named benchmarks there cannot stand in for the harness.
    path = os.pathsep.join(filter(None, (str(root), os.environ.get("PYTHONPATH"))))
    command = [sys.executable, "-P", "-m", "benchmarks", args.harness_command, *args.harness_args]
    return subprocess.run(command, env={**os.environ, "PYTHONPATH": path}, check=False).returncode


def serve(args: argparse.Namespace) -> int:
    """The OpenAI-compatible HTTP server, on uvicorn or (``--ray``) on Ray Serve."""
    try:  # the serve extra: fastapi, uvicorn, prometheus-client
        from kelix_fast.serving.openai_api import build_app
        from kelix_fast.serving.server import build_pipeline, run_server, served_model_name
    except ImportError as e:
        raise UsageError(
            f"serve needs the serve extra: pip install 'kelix-fast[serve]' ({e})"
        ) from e
    if args.ray:
        return _serve_on_ray(args)
    pipe = build_pipeline(
        ar=args.ar,
        dit=args.dit,
        vae=args.vae,
        tiny=args.tiny,
        seed=args.seed,
        device=args.device,
        dtype=_dtype(args),
        model_max_length=args.max_condition_length,
        options=_options(args),
    )
    app = build_app(
        pipe,
        model_name=args.model_name or served_model_name(tiny=args.tiny, ar=args.ar),
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_context=args.max_context,
        max_render_batch=args.max_render_batch,
        api_key=args.api_key or os.environ.get("KELIX_FAST_API_KEY"),
        shutdown_timeout=args.shutdown_timeout,
    )
    run_server(app, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout)
    return 0


def _serve_on_ray(args: argparse.Namespace) -> int:
    """``serve --ray``: the same app on Ray Serve, ``--replicas`` full engines behind Ray's router."""
    from kelix_fast.serving.ray import RayServeOptions, run_ray

    options = RayServeOptions(
        ar=args.ar,
        dit=args.dit,
        vae=args.vae,
        tiny=args.tiny,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        max_condition_length=args.max_condition_length,
        model_name=args.model_name,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_context=args.max_context,
        max_render_batch=args.max_render_batch,
        api_key=args.api_key or os.environ.get("KELIX_FAST_API_KEY"),
        replicas=args.replicas,
        num_gpus=args.gpus_per_replica,
        engine=_options(args),
    )
    run_ray(options, host=args.host, port=args.port, address=args.ray_address)
    return 0


def info(_: argparse.Namespace) -> int:
    """Versions, CUDA, the backend chosen on the CPU, and whether the native extension is built."""
    print(f"kelix_fast {kelix_fast.__version__}, torch {torch.__version__}")
    cuda = torch.cuda.is_available()
    print(f"CUDA available: {cuda}" + (f" ({torch.cuda.get_device_name()})" if cuda else ""))
    probe = torch.zeros(1, 8, dtype=torch.int64), torch.zeros(16, 4)
    print(f"block_embed backend (auto, CPU): {ops.resolve_backend('block_embed', 'auto', *probe)}")
    try:
        from kelix_fast import _C

        print(f"native extension kelix_fast._C: built (C API version {_C.api_version()})")
    except ImportError as e:
        print(f"native extension kelix_fast._C: not built ({e})")
    return 0


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    """The function that runs the parser's command ``name`` (``args.command``). Looked up at each call,
    so that a command replaced in this module (as the tests do) is the one that runs."""
    commands = {
        "demo": demo,
        "generate": generate,
        "chat": chat,
        "reconstruct": reconstruct,
        "bench": bench,
        "serve": serve,
        "info": info,
    }
    return commands[name]


# ---------------------------------------------------------------------------------- errors


def _one_line(error: BaseException) -> str:
    """The error's message on one line (torch's messages span several)."""
    return " ".join(str(error).split())


def _report(error: BaseException, args: argparse.Namespace) -> int:
    """Tell the user what went wrong, one line (the traceback with --debug); the exit status."""
    kind, message = type(error).__name__, _one_line(error)
    if isinstance(error, KeyboardInterrupt):
        code, line = EXIT_INTERRUPTED, f"{PROG}: interrupted"
    elif isinstance(error, USAGE_ERRORS):
        code, line = EXIT_USAGE, f"{PROG}: error: {message or kind}"
    else:
        code = EXIT_FAILED
        what = f"{kind}: {message}" if message else kind
        line = f"{PROG}: {args.command} failed: {what} (run with --debug for the traceback)"
    if args.debug:
        traceback.print_exception(error)
    else:
        print(line, file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (default: ``sys.argv[1:]``) and return its exit status. Errors in the
    command line itself exit through argparse (``SystemExit(2)``, as ``--help`` exits with 0)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    try:
        return _command(args.command)(args)
    # The top of the command: whatever a command raises becomes a one-line message and a status.
    except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001
        return _report(error, args)


if __name__ == "__main__":
    sys.exit(main())
