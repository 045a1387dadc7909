"""Rendering a condition into pixels: flow sampling of a Kelix-DiT, then the DC-AE decode.

The shared tail of text to image (condition: the LLM's hidden states of the image blocks) and of
reconstruction (condition: Kelix-AEDIT's fused code features), each part timed as a stage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from kelix_fast.models.dit import KelixDiT
from kelix_fast.models.vae import decode_latents
from kelix_fast.runtime.flow import sample_latents
from kelix_fast.runtime.timing import StageTimer

Placement = Callable[[Any], contextlib.AbstractContextManager[None]]


def render(
    dit: KelixDiT,
    vae: Any,
    condition: torch.Tensor,
    mask: torch.Tensor,
    *,
    steps: int,
    timer: StageTimer,
    progress: bool = False,
    progress_desc: str = "DiT steps",
    placement: Placement | None = None,
    callback: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
    **sampling: Any,
) -> torch.Tensor:
    """condition [B, Lc, D] and its mask [B, Lc] -> pixels [B, H, W, 3] uint8.

    :func:`~kelix_fast.runtime.flow.sample_latents` with ``steps``, ``callback`` and ``sampling``
    (guidance, schedule, image size, noise or seed, ...), lapped as ``"dit"`` on ``timer``, then the
    DC-AE decode, lapped as ``"vae"``. ``placement(model)`` is entered around each model's work (the
    pipeline's CPU offload moves the model to the GPU for it, and back). ``progress`` shows a tqdm bar
    over the steps.
    """
    place = placement or (lambda _: contextlib.nullcontext())
    with (
        place(dit),
        tqdm(total=steps, desc=progress_desc, disable=not progress, leave=False) as bar,
    ):

        def on_step(step: int, latents: torch.Tensor) -> torch.Tensor | None:
            bar.update(1)
            return None if callback is None else callback(step, latents)

        latents = sample_latents(dit, condition, mask, steps=steps, callback=on_step, **sampling)
    timer.lap("dit")
    with place(vae):
        pixels = decode_latents(vae, latents)
    timer.lap("vae")
    return pixels
