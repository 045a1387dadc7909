"""The command line of ``kelix-fast`` (kelix_fast.cli runs it): the checks of argument values (the
``type=`` of each option, so that a bad value is a usage error before any model loads), the parser with
its help format and one-line errors, and every command's options (``build_parser``).

The parser says which command was asked for (``args.command``); what each command does is in
kelix_fast.cli.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch
from PIL import Image

import kelix_fast
from kelix_fast import ops
from kelix_fast.models.tokenizer import FUSIONS
from kelix_fast.ops.codebook import MODES as VQ_MODES
from kelix_fast.runtime.block_selection import SCORINGS, SEED_BITS
from kelix_fast.runtime.flow import SCHEDULES
from kelix_fast.runtime.sampling import SAMPLERS

PROG = "kelix-fast"
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130  # EPILOG says what they mean
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMAGE_FACTOR = 32  # the DC-AE's downsampling: every image side is a multiple of it
DEVICE_HELP = "the device to run on, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)"
DTYPE_HELP = "weights and activations type (default: bfloat16 on cuda, float32 on cpu)"


class _Parser(argparse.ArgumentParser):
    """argparse's parser with a one-line error: the message and where to look, not the whole usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see: {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and "(default: X)" after every option's help. An option whose default
    is no value (None, an empty list, a flag's off) says in its own help what happens without it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


# ---------------------------------------------------------------------------------- value checks


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def _number(text: str, low: float, high: float | None = None) -> float:
    """A finite float in [low, high] (or [low, inf) when ``high`` is None)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        bounds = f">= {low:g}" if high is None else f"in [{low:g}, {high:g}]"
        raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text}")
    return value


def _non_negative(text: str) -> float:
    return _number(text, 0.0)


def _top_p(text: str) -> float:
    """A probability mass in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # refused below, as NaN is
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _seed(text: str) -> int:
    value = _int_at_least(0)(text)
    if value >= 2**SEED_BITS:
        raise argparse.ArgumentTypeError(f"expected a seed below 2^{SEED_BITS}, got {value}")
    return value


def _image_side(text: str) -> int:
    value = _int_at_least(IMAGE_FACTOR)(text)
    if value % IMAGE_FACTOR:
        raise argparse.ArgumentTypeError(
            f"the image side must be a multiple of {IMAGE_FACTOR} pixels, got {value}"
        )
    return value


def _directory(value: str) -> str:
    if not os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"no such directory: {value}")
    return value


def _file(value: str) -> str:
    if not os.path.isfile(value):
        raise argparse.ArgumentTypeError(f"no such file: {value}")
    return value


def _output_image(value: str) -> str:
    """``-o``: checked before any model runs, so that a typo does not cost the whole computation."""
    path = Path(value)
    if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
        raise argparse.ArgumentTypeError(
            f"{value!r} does not end in an image extension (.png, .jpg, .webp, ...)"
        )
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{str(path.parent)!r} is not a folder")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is a folder")
    if not os.access(path.parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write into {str(path.parent)!r}")
    return value


def _backend_choice(value: str) -> tuple[str, str]:
    op, sep, backend = value.partition("=")
    if not sep or op not in ops.OPS or backend not in ops.BACKENDS[1:]:
        raise argparse.ArgumentTypeError(
            f"--backend takes OP=BACKEND with OP in {list(ops.OPS)} and BACKEND in "
            f"{list(ops.BACKENDS[1:])}, got {value!r}"
        )
    return op, backend


# ---------------------------------------------------------------------------------- the parser


DESCRIPTION = """\
Run Kelix with kelix_fast: image understanding, text to image and image reconstruction, with
the commands below. kelix-fast COMMAND --help lists a command's options."""

EPILOG = """\
exit status: 0 done, 1 the command failed while running, 2 a usage error (nothing was computed),
130 interrupted. Errors are one line; --debug shows the traceback."""


def _add_global_flags(parser: argparse.ArgumentParser, *, on_command: bool) -> None:
    """-v and --debug, before or after the command: a command's copy only sets them when given, so
    that it does not undo the same flag given before the command."""
    default = argparse.SUPPRESS if on_command else False
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="log loading details"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="on an error, show the full traceback instead of a one-line message",
    )


def _add_command(
    commands: argparse._SubParsersAction, name: str, summary: str, details: str = ""
) -> argparse.ArgumentParser:
    """A subcommand with the shared help format and global flags."""
    parser = commands.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + "." + (f"\n\n{details}" if details else ""),
        formatter_class=_HelpFormatter,
    )
    _add_global_flags(parser, on_command=True)
    return parser


def _add_placement(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help=DEVICE_HELP)
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help=DTYPE_HELP)


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    """The flags of :class:`~kelix_fast.options.EngineOptions`, one per field."""
    group = parser.add_argument_group("engine options")
    group.add_argument(
        "--vq",
        choices=VQ_MODES,
        default="reference",
        help="Kelix-Tok's nearest-code search: reference (the official bf16 arithmetic) or exact "
        "(float32)",
    )
    group.add_argument(
        "--scoring",
        choices=SCORINGS,
        default="full",
        help="how a block's ids are scored: full (exact) or structured (faster, approximate)",
    )
    group.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default="sequential",
        help="decode loop: sequential (the engine's) or reference (the official loop, slower)",
    )
    group.add_argument(
        "--cuda-graphs",
        choices=("auto", "on", "off"),
        default="auto",
        help="capture decode steps as CUDA graphs; auto: on CUDA whenever possible",
    )
    group.add_argument(
        "--backend",
        type=_backend_choice,
        action="append",
        default=[],
        metavar="OP=BACKEND",
        help="force a kernel backend for one op, e.g. attention=torch; repeatable (default: each "
        "op picks the fastest that runs here)",
    )


# --ar: required by generate and chat, one of --ar/--tiny for serve.
_AR_FOLDER = {"type": _directory, "metavar": "DIR", "help": "Kelix-SFT folder (weights, tokenizer)"}


def _add_output(parser: argparse.ArgumentParser, default: str) -> None:
    """``-o/--output``: the image file a subcommand writes (checked before any model loads)."""
    parser.add_argument(
        "-o",
        "--output",
        type=_output_image,
        metavar="FILE",
        default=default,
        help="image file to write",
    )


def _add_rendering(
    parser: argparse.ArgumentParser,
    *,
    model: str,
    steps: int,
    guidance: float,
    size: int,
    seed: int,
    seed_help: str,
) -> None:
    """The sampling settings of a DiT (``model``): steps, guidance, image side, seed."""
    parser.add_argument(
        "--steps", type=_int_at_least(1), default=steps, metavar="N", help=f"Euler steps of {model}"
    )
    parser.add_argument(
        "--guidance",
        type=_non_negative,
        default=guidance,
        metavar="SCALE",
        help="classifier-free guidance scale; 1 runs the conditional branch only",
    )
    parser.add_argument(
        "--size",
        type=_image_side,
        default=size,
        metavar="PIXELS",
        help=f"side of the square image in pixels, a multiple of {IMAGE_FACTOR}",
    )
    parser.add_argument("--seed", type=_seed, default=seed, metavar="N", help=seed_help)


def _add_demo(commands: argparse._SubParsersAction) -> None:
    p = _add_command(
        commands,
        "demo",
        "the embedded tiny models end to end (random weights, no files needed)",
        "An image through Kelix-Tok, a chat answer about it, then text to image, each with its\n"
        "timings per stage. The weights are random: the answer and the picture mean nothing.",
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=0,
        metavar="N",
        help="seed of the weights, the sampling and the noise",
    )
    p.add_argument(
        "--blocks",
        type=_int_at_least(1),
        default=8,
        metavar="N",
        help="most blocks of the chat answer",
    )
    p.add_argument(
        "--steps", type=_int_at_least(1), default=4, metavar="N", help="Euler steps of the DiT"
    )
    p.add_argument(
        "--size",
        type=_image_side,
        default=128,
        metavar="PIXELS",
        help=f"side of the square image in pixels, a multiple of {IMAGE_FACTOR}",
    )
    _add_output(p, "kelix_demo.png")
    _add_placement(p)
    _add_engine_options(p)


def _add_generate(commands: argparse._SubParsersAction) -> None:
    p = _add_command(
        commands,
        "generate",
        "text to image with the official checkpoints",
        "The image blocks are generated greedily, as in the official demo (the pipeline takes no\n"
        "sampling settings for them), so there is no --top-k, --top-p or --temperature here:\n"
        "--seed, the seed of the DiT's initial noise, alone varies the picture.",
    )
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--ar", **_AR_FOLDER, required=True)
    p.add_argument("--dit", type=_directory, metavar="DIR", required=True, help="Kelix-DiT folder")
    p.add_argument(
        "--vae",
        type=_directory,
        metavar="DIR",
        required=True,
        help="DC-AE folder (diffusers format)",
    )
    _add_output(p, "kelix.png")
    _add_rendering(
        p,
        model="the DiT",
        steps=50,
        guidance=1.0,
        size=1024,
        seed=42,
        seed_help="seed of the DiT's initial noise",
    )
    p.add_argument(
        "--max-condition-length",
        type=_int_at_least(1),
        default=None,
        help="rows of the DiT's condition (default: the DiT's config value; the release needs 720)",
    )
    _add_placement(p)
    _add_engine_options(p)


def _add_chat(commands: argparse._SubParsersAction) -> None:
    p = _add_command(
        commands,
        "chat",
        "answer a question, optionally about an image",
        "Greedy by default (--top-k 1); --top-k 0 or above 1 samples, and then --top-p,\n"
        "--temperature and --seed apply.",
    )
    p.add_argument("question", help="the question to answer")
    p.add_argument("--ar", **_AR_FOLDER, required=True)
    p.add_argument(
        "--image",
        type=_file,
        metavar="FILE",
        default=None,
        help="image file the question is about (default: none)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=_int_at_least(1),
        default=256,
        metavar="N",
        help="most blocks of the answer (one text token each)",
    )
    sampling = p.add_argument_group("sampling")
    sampling.add_argument(
        "--top-k",
        type=_int_at_least(0),
        default=1,
        metavar="K",
        help="choose each id among the K most likely; 1 is greedy (the most likely), 0 no limit",
    )
    sampling.add_argument(
        "--top-p",
        type=_top_p,
        default=1.0,
        metavar="P",
        help="choose among the most likely ids whose probabilities add up to P; 1 is no limit",
    )
    sampling.add_argument(
        "--temperature",
        type=_non_negative,
        default=1.0,
        metavar="T",
        help="scales the scores: below 1 more predictable, above 1 more varied",
    )
    sampling.add_argument(
        "--seed",
        type=_seed,
        default=None,
        help="seed of the sampling, for a repeatable answer (default: a new one each run)",
    )
    _add_placement(p)
    _add_engine_options(p)


def _add_reconstruct(commands: argparse._SubParsersAction) -> None:
    p = _add_command(
        commands,
        "reconstruct",
        "an image through Kelix-Tok codes and Kelix-AEDIT back to pixels",
        "With the checkpoints: --ar Kelix-SFT (its tokenizer), --aedit Kelix-AEDIT and --vae the\n"
        "DC-AE; or --tiny, the embedded tiny models (random weights).",
    )
    p.add_argument("image", type=_file, help="image file to reconstruct")
    models = p.add_mutually_exclusive_group(required=True)
    models.add_argument(
        "--ar", type=_directory, metavar="DIR", help="Kelix-SFT folder (its Kelix-Tok)"
    )
    models.add_argument(
        "--tiny", action="store_true", help="the embedded tiny models (random weights, no files)"
    )
    p.add_argument(
        "--aedit",
        type=_directory,
        metavar="DIR",
        default=None,
        help="Kelix-AEDIT folder (needed with --ar)",
    )
    p.add_argument(
        "--vae",
        type=_directory,
        metavar="DIR",
        default=None,
        help="DC-AE folder, diffusers format (needed with --ar)",
    )
    _add_output(p, "kelix_reconstruction.png")
    _add_rendering(
        p,
        model="Kelix-AEDIT",
        steps=20,
        guidance=4.5,
        size=512,
        seed=0,
        seed_help="seed of the initial noise (and with --tiny of the weights)",
    )
    p.add_argument(
        "--fusion",
        choices=FUSIONS,
        default="mean",
        help="how a block's 8 code features are combined",
    )
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="default",
        help="timesteps of the Euler steps: default (diffusers') or linspace (the DiT demo's)",
    )
    p.add_argument(
        "--max-pixels",
        type=_int_at_least(1),
        default=324 * 28 * 28,
        metavar="N",
        help="resize the input to at most this many pixels first; 324 x 28^2 gives 18 x 18 blocks",
    )
    _add_placement(p)
    _add_engine_options(p)


def _add_bench(commands: argparse._SubParsersAction) -> None:
    p = _add_command(
        commands,
        "bench",
        "the benchmark harness (python -m benchmarks) of a source checkout",
        "Everything after run or pass goes to the harness; benchmarks/README.md describes it, and\n"
        "kelix-fast bench run --help lists its options. Needs the repository (benchmarks/ beside\n"
        "kelix_fast/), not an installed wheel. Examples:\n"
        "  kelix-fast bench run --suite kernels --cpu --quick --json /tmp/kernels.json\n"
        "  kelix-fast bench pass --cpu --quick",
    )
    p.add_argument(
        "harness_command",
        choices=("run", "pass"),
        metavar="{run,pass}",
        help="run: one suite; pass: build, tests and every suite",
    )
    p.add_argument(
        "harness_args",
        nargs=argparse.REMAINDER,
        metavar="ARGS",
        help="the harness's options, passed as they are",
    )


def _add_serve(commands: argparse._SubParsersAction) -> None:
    p = _add_command(
        commands,
        "serve",
        "the OpenAI-compatible HTTP server (chat, images)",
        "Needs the serve extra: pip install 'kelix-fast[serve]'.",
    )
    models = p.add_mutually_exclusive_group(required=True)
    models.add_argument("--ar", **_AR_FOLDER)
    models.add_argument(
        "--tiny", action="store_true", help="the embedded tiny models (random weights, no files)"
    )
    p.add_argument(
        "--dit",
        type=_directory,
        metavar="DIR",
        default=None,
        help="Kelix-DiT folder (default: no images)",
    )
    p.add_argument(
        "--vae",
        type=_directory,
        metavar="DIR",
        default=None,
        help="DC-AE folder, diffusers format (needed with --dit)",
    )
    p.add_argument(
        "--max-condition-length",
        type=_int_at_least(1),
        default=None,
        help="rows of the DiT's condition (default: the DiT's config value; the release needs 720)",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of the weights of --tiny")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=_int_at_least(0), default=8000, help="port to listen on")
    p.add_argument(
        "--model-name",
        default=None,
        help="model id in the API (default: kelix-tiny, or the --ar folder's name)",
    )
    p.add_argument(
        "--max-batch", type=_int_at_least(1), default=32, help="requests decoded together"
    )
    p.add_argument(
        "--max-queue",
        type=_int_at_least(0),
        default=256,
        help="requests that may wait; one more is answered 429",
    )
    p.add_argument(
        "--max-context",
        type=_int_at_least(1),
        default=None,
        help="positions per request (default: the model's)",
    )
    p.add_argument(
        "--max-render-batch",
        type=_int_at_least(1),
        default=8,
        help="images the DiT renders together",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health "
        "(default: $KELIX_FAST_API_KEY, else none)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=_non_negative,
        default=30.0,
        help="seconds running requests get after SIGTERM before they are aborted",
    )
    ray = p.add_argument_group("scale-out on Ray Serve (the serve extra)")
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve instead of uvicorn")
    ray.add_argument(
        "--replicas", type=_int_at_least(1), default=1, help="full engines behind Ray's router"
    )
    ray.add_argument(
        "--gpus-per-replica",
        type=_non_negative,
        default=0.0,
        help="GPUs each replica takes; 1 on GPU machines",
    )
    ray.add_argument(
        "--ray-address",
        default=None,
        help="a running Ray cluster to join, 'auto' or HOST:6379 (default: a local instance)",
    )
    _add_placement(p)
    _add_engine_options(p)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: global flags and every subcommand. ``args.command`` names the command
    to run; kelix_fast.cli runs it."""
    parser = _Parser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=_HelpFormatter
    )
    parser.add_argument(
        "--version", action="version", version=f"kelix_fast {kelix_fast.__version__}"
    )
    _add_global_flags(parser, on_command=False)
    commands = parser.add_subparsers(
        title="commands", dest="command", required=True, metavar="COMMAND"
    )
    for add in (_add_demo, _add_generate, _add_chat, _add_reconstruct, _add_bench, _add_serve):
        add(commands)
    _add_command(commands, "info", "versions, CUDA, kernel backends, the native extension")
    return parser
