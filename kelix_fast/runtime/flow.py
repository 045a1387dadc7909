"""Flow-matching Euler sampling of Kelix-DiT latents (kelix-dit.md §5, golden README "Sampling").

The schedule is diffusers' ``FlowMatchEulerDiscreteScheduler(shift)`` given the explicit sigmas
``linspace(1, 1/N, N)`` of the official demo, reproduced with the same float32 arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from kelix_fast.models.dit import DiTCondition, KelixDiT, dit_position_args

SCHEDULES = ("linspace", "default")


def flow_schedule(
    steps: int, shift: float = 3.0, *, schedule: str = "linspace"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [steps + 1] float32 ending in 0, timesteps [steps] float32 = 1000 * sigma).

    ``schedule="linspace"`` (the Kelix-DiT t2i demo, kelix-dit.md §5.1): ``s = float32(linspace(1, 1/N,
    N))`` (linspace in float64), ``sigma = shift*s / (1 + (shift-1)*s)`` in float32.
    ``schedule="default"`` (diffusers without explicit sigmas: AEDIT and the 20-step scripts, §5.3):
    ``linspace(1000, 1000*sigma_min, N) / 1000`` in float64, with ``sigma_min`` the float32 shifted
    value of 1/1000, then shifted *again* in float64 (a diffusers quirk) and cast to float32.
    The model truncates the timesteps to integers (874.99994 -> 874), as the official one does.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"flow_schedule: steps must be an int >= 1, got {steps!r}")
    if not isinstance(shift, (int, float)) or not shift > 0:
        raise ValueError(f"flow_schedule: shift must be > 0, got {shift!r}")
    if schedule not in SCHEDULES:
        raise ValueError(
            f"flow_schedule: schedule must be one of {list(SCHEDULES)}, got {schedule!r}"
        )
    if schedule == "linspace":
        s = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
        shift32 = np.float32(shift)
        sigmas = shift32 * s / (np.float32(1.0) + (shift32 - np.float32(1.0)) * s)
    else:
        first = np.float32(1.0 / 1000)
        sigma_min = float(
            np.float32(shift) * first / (np.float32(1.0) + np.float32(shift - 1) * first)
        )
        s = np.linspace(1000.0, sigma_min * 1000.0, steps) / 1000.0
        sigmas = (shift * s / (1.0 + (shift - 1.0) * s)).astype(np.float32)
    timesteps = sigmas * np.float32(1000.0)
    sigmas = np.concatenate([sigmas, np.zeros(1, dtype=np.float32)])
    return torch.from_numpy(sigmas), torch.from_numpy(timesteps)


def sample_latents(
    dit: KelixDiT,
    cond_hidden: torch.Tensor,
    cond_mask: torch.Tensor,
    *,
    steps: int = 50,
    guidance_scale: float = 1.0,
    shift: float = 3.0,
    schedule: str = "linspace",
    image_size: int = 1024,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    image_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Denoise latents from noise with FlowMatch Euler, conditioned on LLM hidden states.

    Everything that does not depend on the step (connector, caption MLP, every block's condition K/V,
    positions) is computed once. ``guidance_scale == 1`` runs the conditional branch only: the official
    batch-of-2 result ``v_u + 1 * (v_c - v_u)`` equals ``v_c`` up to one rounding. Otherwise the official
    CFG layout runs, ``[null conditions..., conditions...]`` in one batch. Each Euler update is computed
    in float32 and the latent rounded back to the model dtype, as the official loop does.

    Args:
        dit: the model. cond_hidden: [B, Lc, D_llm] last-layer LLM states (zero rows past the mask).
        cond_mask: [B, Lc], 1 on the valid prefix of each condition.
        steps: >= 1 Euler steps. shift, schedule: see :func:`flow_schedule` (3.0 and "linspace" for
            the Kelix-DiT demo).
        image_size: output side in pixels, a multiple of the VAE factor (``vae_downsample_rate``).
        noise: [B, C, h, w] initial latents, or None to draw them (float32, CPU generator of ``seed``,
            then moved to the model: the same numbers on every device).
        callback: called as ``callback(step, latents)`` after every step.
        image_grid: the patch grid of a condition image (AEDIT), for the cross-attention positions; None
            for the T2I demo's (see :func:`dit_position_args`).

    Returns:
        [B, C, h, w] latents in the model dtype.
    """
    config = dit.config
    rate = config.vae_downsample_rate
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, int)
        or image_size < rate
        or image_size % rate
    ):
        raise ValueError(
            f"sample_latents: image_size must be a positive multiple of {rate}, got {image_size!r}"
        )
    if (
        not isinstance(guidance_scale, (int, float))
        or not math.isfinite(guidance_scale)
        or guidance_scale < 0
    ):
        raise ValueError(
            f"sample_latents: guidance_scale must be a finite number >= 0, got {guidance_scale!r}"
        )
    sigmas, timesteps = flow_schedule(steps, shift, schedule=schedule)
    if not isinstance(cond_hidden, torch.Tensor) or cond_hidden.dim() != 3:
        raise ValueError(
            f"sample_latents: cond_hidden must be a [B, Lc, D] tensor, got {_describe(cond_hidden)}"
        )
    batch, length = cond_hidden.shape[:2]
    if not isinstance(cond_mask, torch.Tensor) or tuple(cond_mask.shape) != (batch, length):
        raise ValueError(
            f"sample_latents: cond_mask must have shape [{batch}, {length}], got {_describe(cond_mask)}"
        )
    valid = cond_mask.ne(0).sum(-1).tolist()
    if min(valid) < 1:
        raise ValueError(
            f"sample_latents: every condition needs at least one valid row, got {valid}"
        )
    side = image_size // rate
    latent_shape = (batch, config.in_channels, side, side)
    if noise is None:
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        noise = torch.randn(latent_shape, generator=generator)
    elif not isinstance(noise, torch.Tensor) or tuple(noise.shape) != latent_shape:
        raise ValueError(
            f"sample_latents: noise must have shape {list(latent_shape)}, got {_describe(noise)}"
        )

    connected = dit.connect(cond_hidden.to(device=dit.device, dtype=dit.dtype))
    null, null_mask = dit.null_condition(length)
    conditions, nulls = [], []
    for b in range(batch):
        latent_pos, cond_pos = dit_position_args(
            (side, side),
            cond_length=length,
            valid_length=valid[b],
            image_size=image_size,
            image_grid=image_grid,
        )
        positions = {"cond_positions": cond_pos, "latent_positions": latent_pos}
        conditions.append(
            dit.prepare_condition(connected[b : b + 1], cond_mask[b : b + 1], **positions)
        )
        if guidance_scale != 1.0:
            nulls.append(dit.prepare_condition(null, null_mask, **positions))
    condition = DiTCondition.concat(nulls + conditions)

    latents = noise.to(device=dit.device, dtype=dit.dtype)
    timesteps = timesteps.to(dit.device)
    for i in range(steps):
        branches = 1 if guidance_scale == 1.0 else 2
        t = timesteps[i].expand(branches * batch)
        velocity = dit.predict_velocity(latents.repeat(branches, 1, 1, 1), t, condition)
        if branches == 2:
            v_null, v_cond = velocity.chunk(2)
            velocity = v_null + guidance_scale * (v_cond - v_null)
        step = float(sigmas[i + 1] - sigmas[i])
        latents = (latents.float() + step * velocity.float()).to(dit.dtype)
        if callback is not None:
            callback(i, latents)
    return latents


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {list(value.shape)}"
    return type(value).__name__
