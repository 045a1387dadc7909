"""Flow-matching Euler sampling of Kelix-DiT latents (kelix-dit.md §5, golden README "Sampling").

The schedule is diffusers' ``FlowMatchEulerDiscreteScheduler(shift)`` given the explicit sigmas
``linspace(1, 1/N, N)`` of the official demo, reproduced with the same float32 arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from kelix_fast.arguments import (
    check_bool,
    check_finite,
    check_finite_number,
    check_int,
    check_seed,
    is_int,
)
from kelix_fast.models.dit import DiTCondition, KelixDiT, dit_position_args
from kelix_fast.runtime.euler_step import EulerStep

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
    steps = check_int("flow_schedule: steps", steps, minimum=1)
    check_finite_number("flow_schedule: shift", shift, minimum=0, strict=True)
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


def check_sampling(
    dit: KelixDiT,
    *,
    batch: int,
    steps: int,
    guidance_scale: float,
    image_size: int,
    noise: torch.Tensor | None = None,
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    op: str = "sample_latents",
    names: Mapping[str, str] | None = None,
    shift: float | None = None,
) -> tuple[int, int, int, int]:
    """Check the sampling arguments of :func:`sample_latents` for ``batch`` images, computing nothing:
    a caller that runs other models first (the pipeline's AR model) calls it before them.

    ``op`` and ``names`` (``{"image_size": "size", ...}``) make the messages name the caller and its
    own argument names. Returns the latent shape (B, C, h, w). Raises ValueError/TypeError; non-finite
    data (a NaN/Inf ``guidance_scale``, ``shift`` or ``noise`` value) is refused, naming the argument.
    """
    names = names or {}

    def name(arg: str) -> str:
        return f"{op}: {names.get(arg, arg)}"

    check_int(name("steps"), steps, minimum=1)
    rate = dit.config.vae_downsample_rate
    if not is_int(image_size) or image_size < rate or image_size % rate:
        raise ValueError(
            f"{name('image_size')} must be a positive multiple of {rate}, got {image_size!r}"
        )
    check_finite_number(name("guidance_scale"), guidance_scale, minimum=0)
    if shift is not None:
        check_finite_number(name("shift"), shift, minimum=0, strict=True)
    side = image_size // rate
    shape = (batch, dit.config.in_channels, side, side)
    if noise is not None:
        if seed is not None or generator is not None:
            raise ValueError(
                f"{name('noise')} is the initial latents: give it or {names.get('seed', 'seed')}/"
                f"{names.get('generator', 'generator')}, not both"
            )
        if (
            not isinstance(noise, torch.Tensor)
            or tuple(noise.shape) != shape
            or not noise.is_floating_point()
        ):
            raise ValueError(
                f"{name('noise')} must have shape {list(shape)} (float), got {_describe(noise)}"
            )
        check_finite(name("noise"), noise)
    if seed is not None and generator is not None:
        raise ValueError(f"{name('seed')} and {names.get('generator', 'generator')}: give one")
    if seed is not None:
        noise_seeds(seed, batch, name=name("seed"))
    if generator is not None:
        generators = [generator] if isinstance(generator, torch.Generator) else generator
        if (
            not isinstance(generators, Sequence)
            or not all(isinstance(g, torch.Generator) for g in generators)
            or (not isinstance(generator, torch.Generator) and len(generators) != batch)
        ):
            raise ValueError(
                f"{name('generator')} must be a torch.Generator or a list of {batch} (one per "
                f"image), got {generator!r:.100}"
            )
    return shape


def noise_seeds(seed: object, batch: int, *, name: str = "seed") -> list[int]:
    """The initial-noise seed of each of ``batch`` images: one int s stands for s .. s + batch - 1
    (image b gets s + b, so image 0 is what s gives alone), a list gives one per image; each a
    generator seed in [0, 2^63). Raises TypeError/ValueError naming ``name``."""
    if is_int(seed) or not isinstance(seed, Sequence) or isinstance(seed, str):
        first = check_seed(name, seed, count=batch)
        return [first + b for b in range(batch)]
    if len(seed) != batch:
        raise ValueError(
            f"{name} must be an int (image b gets seed + b) or a list of {batch} ints (one per "
            f"image), got {seed!r:.100}"
        )
    return [check_seed(f"{name}[{b}]", s) for b, s in enumerate(seed)]


def initial_noise(
    shape: tuple[int, int, int, int],
    *,
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """The initial latents [B, C, h, w], float32, drawn on the CPU unless a generator lives elsewhere.

    How the batch maps to the randomness (checked by :func:`check_sampling`):

    * ``seed`` int s: image b from ``torch.Generator().manual_seed(s + b)``, so image 0 is what the
      same seed gives alone, on every device; a list: one seed per image.
    * ``generator`` (diffusers' convention): one generator draws the whole batch in one ``randn``
      on its device; a list: image b from generator b.
    * neither: torch's global RNG.
    """
    if seed is not None:
        seeds = noise_seeds(seed, shape[0])
        return torch.stack(
            [torch.randn(shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]
        )
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device)
    if generator is not None:
        return torch.stack(
            [torch.randn(shape[1:], generator=g, device=g.device).cpu() for g in generator]
        )
    return torch.randn(shape)


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
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    callback: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
    image_grid: tuple[int, int] | None = None,
    cuda_graph: bool | None = None,
) -> torch.Tensor:
    """Denoise latents from noise with FlowMatch Euler, conditioned on LLM hidden states.

    Everything that does not depend on the step (connector, caption MLP, every block's condition K/V,
    positions) is computed once. ``guidance_scale == 1`` runs the conditional branch only: the official
    batch-of-2 result ``v_u + 1 * (v_c - v_u)`` equals ``v_c`` up to one rounding. Otherwise the official
    CFG layout runs, ``[null conditions..., conditions...]`` in one batch, the null condition of the
    condition's length (:meth:`KelixDiT.null_condition`; a condition may be longer than the DiT's
    ``model_max_length``). Each Euler update is computed in float32 and the latent rounded back to the
    model dtype, as the official loop does.

    Args:
        dit: the model. cond_hidden: [B, Lc, D_llm] last-layer LLM states (zero rows past the mask).
        cond_mask: [B, Lc], 1 on the valid prefix of each condition.
        steps: >= 1 Euler steps. shift, schedule: see :func:`flow_schedule` (3.0 and "linspace" for
            the Kelix-DiT demo).
        image_size: output side in pixels, a multiple of the VAE factor (``vae_downsample_rate``).
        noise: [B, C, h, w] initial latents, or None to draw them (float32 on the CPU, then moved to
            the model: the same numbers on every device) from ``seed`` or ``generator`` as
            :func:`initial_noise` says (one seed: image b gets ``seed + b``).
        callback: called as ``callback(step, latents)`` after every step; a tensor it returns (of the
            latents' shape) replaces the latents, any other return value is ignored.
        image_grid: the patch grid of a condition image (AEDIT), for the cross-attention positions; None
            for the T2I demo's (see :func:`dit_position_args`).
        cuda_graph: capture the step as a CUDA graph at the first step and replay it for the others
            (:class:`~kelix_fast.runtime.euler_step.EulerStep`); None: on for a model on CUDA. The
            results equal the eager loop's. True for a CPU model raises.

    Returns:
        [B, C, h, w] latents in the model dtype.
    """
    if not isinstance(cond_hidden, torch.Tensor) or cond_hidden.dim() != 3:
        raise ValueError(
            f"sample_latents: cond_hidden must be a [B, Lc, D] tensor, got {_describe(cond_hidden)}"
        )
    batch, length = cond_hidden.shape[:2]
    if not isinstance(cond_mask, torch.Tensor) or tuple(cond_mask.shape) != (batch, length):
        raise ValueError(
            f"sample_latents: cond_mask must have shape [{batch}, {length}], got {_describe(cond_mask)}"
        )
    # Every row, padding included: a NaN padding row still reaches the image (0 * NaN = NaN).
    check_finite("sample_latents: cond_hidden", cond_hidden)
    valid = cond_mask.ne(0).sum(-1).tolist()
    if min(valid) < 1:
        raise ValueError(
            f"sample_latents: every condition needs at least one valid row, got {valid}"
        )
    latent_shape = check_sampling(
        dit,
        batch=batch,
        steps=steps,
        guidance_scale=guidance_scale,
        image_size=image_size,
        noise=noise,
        seed=seed,
        generator=generator,
        shift=shift,
    )
    sigmas, timesteps = flow_schedule(steps, shift, schedule=schedule)
    if noise is None:
        noise = initial_noise(latent_shape, seed=seed, generator=generator)

    side = latent_shape[-1]
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
            dit.prepare_condition(
                connected[b : b + 1], cond_mask[b : b + 1].to(dit.device), **positions
            )
        )
        if guidance_scale != 1.0:
            nulls.append(dit.prepare_condition(null, null_mask, **positions))
    condition = DiTCondition.concat(nulls + conditions)

    if cuda_graph is None:
        cuda_graph = dit.device.type == "cuda"
    euler = EulerStep(
        dit,
        condition,
        noise.to(device=dit.device, dtype=dit.dtype),
        guidance_scale=guidance_scale,
        cuda_graph=check_bool("sample_latents: cuda_graph", cuda_graph),
    )
    timesteps = timesteps.to(dit.device)
    for i in range(steps):
        latents = euler(timesteps[i], float(sigmas[i + 1] - sigmas[i]))
        if callback is not None:
            # A copy: the step's buffer is overwritten by the next step, and callers keep latents.
            replaced = callback(i, latents.clone())
            if isinstance(replaced, torch.Tensor):
                if replaced.shape != latents.shape:
                    raise ValueError(
                        f"sample_latents: callback returned latents of shape {list(replaced.shape)}, "
                        f"expected {list(latents.shape)}"
                    )
                check_finite("sample_latents: the latents returned by callback", replaced)
                euler.replace(replaced.to(device=dit.device, dtype=dit.dtype))
    return euler.latents


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {list(value.shape)}"
    return type(value).__name__
