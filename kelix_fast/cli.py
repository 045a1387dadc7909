"""The ``kelix-fast`` command: ``demo`` (the embedded tiny model end to end) and ``info``."""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

import kelix_fast
from kelix_fast import ops, presets
from kelix_fast.processor import image_to_patches


def _synthetic_image(height: int, width: int) -> torch.Tensor:
    """A deterministic colour gradient [H, W, 3] uint8."""
    rows = torch.linspace(0, 255, height)[:, None].expand(height, width)
    cols = torch.linspace(0, 255, width)[None, :].expand(height, width)
    return torch.stack([rows, cols, (rows + cols) / 2], dim=-1).round().to(torch.uint8)


def demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    engine = presets.tiny(seed=args.seed, device=args.device)
    print(
        f"kelix_fast {kelix_fast.__version__}: tiny Kelix AR (seed {args.seed}) on {engine.device}, "
        f"{str(engine.dtype).removeprefix('torch.')}, resident {engine.resident_bytes() / 1e6:.1f} MB, "
        f"built in {time.perf_counter() - start:.2f} s"
    )
    pixel_values, grid = image_to_patches(_synthetic_image(56, 84))
    image_ids = engine.tokenize_images(pixel_values, grid)
    print(
        f"Kelix-Tok: 56x84 image -> grid {grid[0].tolist()} -> {image_ids.shape[0]} visual blocks of 8 ids"
    )
    print(f"  first block: {image_ids[0].tolist()}")
    n_image = image_ids.shape[0]
    prompt = [
        presets.IM_START, 872, 198,  # <|im_start|>user\n
        presets.VISION_START, *[presets.IMAGE_PAD] * n_image, presets.VISION_END,
        presets.IM_END, 198, presets.IM_START, 77091, 198,  # <|im_end|>\n<|im_start|>assistant\n
    ]  # fmt: skip
    start = time.perf_counter()
    out = engine.generate(
        [prompt],
        pixel_values=pixel_values,
        image_grid_thw=grid,
        max_new_blocks=args.blocks,
        top_k=args.top_k,
        temperature=args.temperature,
        seed=args.seed,
    )
    elapsed = time.perf_counter() - start
    new = out.groups[0, len(prompt) : int(out.lengths[0])]
    print(
        f"generated {new.shape[0]} blocks in {elapsed:.2f} s ({new.shape[0] / elapsed:.1f} blocks/s):"
    )
    q_eos = engine.config.llm.q_eos_token
    for i, group in enumerate(new.tolist()):
        ids = group[: group.index(q_eos)] if q_eos in group else group
        kind = "visual" if ids and ids[0] >= engine.config.llm.vocab_size else "text"
        print(f"  block {i:2d} ({kind:6s}, {len(ids)} ids): {ids}")
    return 0


def info(_: argparse.Namespace) -> int:
    print(f"kelix_fast {kelix_fast.__version__}, torch {torch.__version__}")
    print(f"CUDA available: {torch.cuda.is_available()}")
    probe = torch.zeros(1, 8, dtype=torch.int64), torch.zeros(16, 4)
    print(f"block_embed backend (auto, CPU): {ops.resolve_backend('block_embed', 'auto', *probe)}")
    try:
        from kelix_fast import _C  # noqa: F401

        print("native extension kelix_fast._C: built")
    except ImportError as e:
        print(f"native extension kelix_fast._C: not built ({e})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kelix-fast", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log loading details")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "demo", help="tokenize an image and generate blocks with the embedded tiny model"
    )
    p.add_argument("--seed", type=int, default=0, help="weights and sampling seed")
    p.add_argument("--blocks", type=int, default=12, help="new blocks to generate")
    p.add_argument("--top-k", type=int, default=1, help="1 = greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.set_defaults(run=demo)
    sub.add_parser("info", help="versions and available backends").set_defaults(run=info)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
