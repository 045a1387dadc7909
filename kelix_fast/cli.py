"""The ``kelix-fast`` command: ``demo`` (the embedded tiny models, no files), ``generate`` (text to
image), ``chat`` (image understanding), ``serve`` (the OpenAI-compatible HTTP server) and ``info``. The
only module that prints or reads the environment."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch

import kelix_fast
from kelix_fast import ops
from kelix_fast.ops.codebook import MODES as VQ_MODES
from kelix_fast.options import EngineOptions
from kelix_fast.pipeline import KelixPipeline
from kelix_fast.runtime.block_selection import SCORINGS
from kelix_fast.runtime.sampling import SAMPLERS


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


def demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    pipe = KelixPipeline.tiny(seed=args.seed, device=args.device, options=_options(args))
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
    answer = pipe.chat((image, "What is in this picture?"), max_new_tokens=args.blocks)
    print(f"chat (random weights, so no meaning): {answer!r}")
    _print_timings("image understanding, per stage", pipe.timings)
    picture = pipe.generate_image(
        "a watercolor fox", steps=args.steps, size=args.size, seed=args.seed
    )
    picture.save(args.output)
    print(f"text to image: {picture.size[0]}x{picture.size[1]} written to {args.output}")
    _print_timings("text to image, per stage", pipe.timings)
    return 0


def _directory(value: str) -> str:
    if not os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"no such directory: {value}")
    return value


def _file(value: str) -> str:
    if not os.path.isfile(value):
        raise argparse.ArgumentTypeError(f"no such file: {value}")
    return value


def _dtype(value: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if value not in dtypes:
        raise argparse.ArgumentTypeError(f"dtype must be one of {list(dtypes)}, got {value}")
    return dtypes[value]


def _backend_choice(value: str) -> tuple[str, str]:
    op, sep, backend = value.partition("=")
    if not sep or op not in ops.OPS or backend not in ops.BACKENDS[1:]:
        raise argparse.ArgumentTypeError(
            f"--backend takes OP=BACKEND with OP in {list(ops.OPS)} and BACKEND in "
            f"{list(ops.BACKENDS[1:])}, got {value!r}"
        )
    return op, backend


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    """The flags of :class:`~kelix_fast.options.EngineOptions`, one per field."""
    group = p.add_argument_group("engine options")
    group.add_argument("--vq", choices=VQ_MODES, default="reference", help="Kelix-Tok arithmetic")
    group.add_argument("--scoring", choices=SCORINGS, default="full", help="block scoring")
    group.add_argument("--sampler", choices=SAMPLERS, default="sequential", help="decode loop")
    group.add_argument(
        "--cuda-graphs",
        choices=("auto", "on", "off"),
        default="auto",
        help="capture decode steps as CUDA graphs (auto: on CUDA when possible)",
    )
    group.add_argument(
        "--backend",
        type=_backend_choice,
        action="append",
        default=[],
        metavar="OP=BACKEND",
        help="force a kernel backend for an op, e.g. attention=torch (repeatable)",
    )


def _options(args: argparse.Namespace) -> EngineOptions:
    graphs = {"auto": None, "on": True, "off": False}[args.cuda_graphs]
    return EngineOptions(
        vq=args.vq,
        scoring=args.scoring,
        sampler=args.sampler,
        cuda_graphs=graphs,
        backends=dict(args.backend),
    )


def generate(args: argparse.Namespace) -> int:
    pipe = KelixPipeline.from_pretrained(
        args.ar,
        args.dit,
        args.vae,
        device=args.device,
        dtype=args.dtype,
        model_max_length=args.max_condition_length,
        options=_options(args),
    )
    image = pipe.generate_image(
        args.prompt,
        steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        size=args.size,
        progress=True,
    )
    image.save(args.output)
    print(f"written {args.output} ({image.size[0]}x{image.size[1]})")
    _print_timings("per stage", pipe.timings)
    return 0


def chat(args: argparse.Namespace) -> int:
    pipe = KelixPipeline.from_pretrained(
        args.ar, device=args.device, dtype=args.dtype, options=_options(args)
    )
    if args.image is None:
        messages = [{"role": "user", "content": args.question}]
        print(pipe.chat(messages, max_new_tokens=args.max_new_tokens, progress=True))
    else:
        question = (args.image, args.question)
        print(pipe.chat(question, max_new_tokens=args.max_new_tokens, progress=True))
    _print_timings("per stage", pipe.timings)
    return 0


def serve(args: argparse.Namespace) -> int:
    try:  # the serve extra: fastapi, uvicorn, prometheus-client
        from kelix_fast.serving.openai_api import build_app
        from kelix_fast.serving.server import build_pipeline, run_server
    except ImportError as e:
        print(f"kelix-fast serve needs the serve extra: pip install 'kelix-fast[serve]' ({e})")
        return 2
    if args.ray:
        return _serve_on_ray(args)
    pipe = build_pipeline(
        ar=args.ar,
        dit=args.dit,
        vae=args.vae,
        tiny=args.tiny,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        model_max_length=args.max_condition_length,
        options=_options(args),
    )
    default_name = "kelix-tiny" if args.tiny else os.path.basename(os.path.normpath(args.ar))
    app = build_app(
        pipe,
        model_name=args.model_name or default_name,
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
        dtype=None if args.dtype is None else str(args.dtype).removeprefix("torch."),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kelix-fast", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log loading details")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_device(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
        p.add_argument(
            "--dtype", type=_dtype, default=None, help="default: bfloat16 on cuda, float32 on cpu"
        )

    p = sub.add_parser(
        "demo", help="the embedded tiny models end to end: understanding and text to image"
    )
    p.add_argument("--seed", type=int, default=0, help="weights, sampling and noise seed")
    p.add_argument("--blocks", type=int, default=8, help="new blocks of the chat answer")
    p.add_argument("--steps", type=int, default=4, help="DiT sampling steps")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (multiple of 32)")
    p.add_argument("-o", "--output", default="kelix_demo.png", help="PNG to write")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    _add_engine_options(p)
    p.set_defaults(run=demo)

    p = sub.add_parser("generate", help="text to image with the official checkpoints")
    p.add_argument(
        "--ar", type=_directory, required=True, help="Kelix-SFT directory (weights, tokenizer)"
    )
    p.add_argument("--dit", type=_directory, required=True, help="Kelix-DiT directory")
    p.add_argument("--vae", type=_directory, required=True, help="diffusers DC-AE directory")
    p.add_argument("prompt", help="what to draw")
    p.add_argument("-o", "--output", default="kelix.png", help="PNG to write")
    p.add_argument("--steps", type=int, default=50, help="Euler steps (official demo: 50)")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale (official demo: 1.0)")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels")
    p.add_argument("--seed", type=int, default=42, help="initial noise seed")
    p.add_argument(
        "--max-condition-length",
        type=int,
        default=None,
        help="DiT model_max_length (the release needs 720)",
    )
    add_device(p)
    _add_engine_options(p)
    p.set_defaults(run=generate)

    p = sub.add_parser("chat", help="answer a question, optionally about an image")
    p.add_argument(
        "--ar", type=_directory, required=True, help="Kelix-SFT directory (weights, tokenizer)"
    )
    p.add_argument("--image", type=_file, default=None, help="image file")
    p.add_argument("question")
    p.add_argument("--max-new-tokens", type=int, default=256)
    add_device(p)
    _add_engine_options(p)
    p.set_defaults(run=chat)

    p = sub.add_parser("serve", help="the OpenAI-compatible HTTP server (chat, images)")
    models = p.add_mutually_exclusive_group(required=True)
    models.add_argument("--ar", type=_directory, help="Kelix-SFT directory (weights, tokenizer)")
    models.add_argument(
        "--tiny", action="store_true", help="the embedded tiny models (random weights, no files)"
    )
    p.add_argument("--dit", type=_directory, default=None, help="Kelix-DiT directory (images)")
    p.add_argument("--vae", type=_directory, default=None, help="diffusers DC-AE directory")
    p.add_argument(
        "--max-condition-length",
        type=int,
        default=None,
        help="DiT model_max_length (the release needs 720)",
    )
    p.add_argument("--seed", type=int, default=0, help="weights seed of --tiny")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="model id (default: the --ar folder name)")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting; more get 429")
    p.add_argument(
        "--max-context", type=int, default=None, help="positions per request (default: model's)"
    )
    p.add_argument(
        "--max-render-batch", type=int, default=8, help="images the DiT renders together"
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health "
        "(default: $KELIX_FAST_API_KEY, else none)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds running requests get after SIGTERM before they are aborted",
    )
    ray = p.add_argument_group("scale-out on Ray Serve (the serve extra)")
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve instead of uvicorn")
    ray.add_argument("--replicas", type=int, default=1, help="full engines behind Ray's router")
    ray.add_argument(
        "--gpus-per-replica", type=float, default=0.0, help="GPUs each replica takes (1 on GPUs)"
    )
    ray.add_argument(
        "--ray-address",
        default=None,
        help="a running Ray cluster to join ('auto' or HOST:6379; default: a local instance)",
    )
    add_device(p)
    _add_engine_options(p)
    p.set_defaults(run=serve)

    sub.add_parser("info", help="versions, device and available backends").set_defaults(run=info)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
