"""Kelix-DiT positions: the token grid positions and the tables built from them (kelix-dit.md §3.7, §4.4).

* :class:`GridPositions` and :func:`dit_position_args` (the official ``compute_pos_args`` of the T2I demo):
  where each latent and condition token sits on its 2-D grid;
* ``_rope_tables``: the cross-attention 2-D RoPE cos/sin tables for those positions;
* ``_sincos_pos_embed``: the SANA/PixArt sin-cos table that ``use_pe`` adds to the latent tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kelix_fast.image_processing import smart_resize

__all__ = ["GridPositions", "dit_position_args"]

_ROPE_BASE = 10000.0
# compute_pos_args: H_x = W_x = image_size // 28, the ViT's merged-patch size (§4.4).
_POS_PATCH = 28


@dataclass(frozen=True)
class GridPositions:
    """2-D positions of a token sequence for the cross-attention RoPE (§3.7, §4.4).

    Attributes:
        rows, cols: [n] int64, position of each token (padding rows of a condition are (0, 0)).
        grid: ``(H, W)``, the grid size the official code pairs with these positions: ``(H_x, W_x)`` for
            latents, ``(H_y, W_y)`` for a condition. Only ``use_position_scale`` reads it.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    grid: tuple[int, int]


def dit_position_args(
    latent_hw: tuple[int, int],
    *,
    cond_length: int,
    valid_length: int,
    image_size: int,
    cond_pos_scale: float = 1.0,
    image_grid: tuple[float, float] | None = None,
) -> tuple[GridPositions, GridPositions]:
    """The official ``compute_pos_args`` of the T2I demo, quirks included (§4.4, golden README "DiT forward").

    The condition grid is ``(h_c, w_c) = smart_resize(floor(g_h / 2), floor(g_w / 2), factor=1,
    max_pixels=Lc)`` for the condition image's patch grid ``image_grid = (g_h, g_w)``. The T2I demo passes
    ``(2*sqrt(Lc), 2*sqrt(Lc))`` (the default), so ``h_c = w_c = floor(sqrt(Lc))``. Its width is then corrected to ``w_corr = w_c + ceil((n - h_c*w_c) / h_c)``,
    which shrinks it when ``n < h_c*w_c``; the condition positions are the first ``min(h_c*w_corr, Lc)``
    raster cells of ``h_c x w_corr`` (more than ``n`` when the grid is not full), scaled by
    ``cond_pos_scale`` and truncated, padded with (0, 0) to ``Lc``. ``H_x = W_x = image_size // 28`` (not
    the latent size), ``H_y = h_c``, ``W_y = w_corr``.

    Args:
        latent_hw: ``(h, w)`` latent grid; latent token ``k`` sits at ``(k // w, k % w)``.
        cond_length: Lc, rows of the (padded) condition.
        valid_length: n, valid rows of the condition (``token_embed_lengths[0]``), 1 <= n <= Lc.
        image_size: output image side in pixels.
        image_grid: the condition image's patch grid (``image_grid_thw[0][1:]``), e.g. the real grid of
            an AEDIT input; default the T2I demo's ``2*sqrt(Lc)`` square.

    Returns:
        ``(latent_positions, cond_positions)``: [h*w] and [Lc] positions.
    """
    op = "dit_position_args"
    if (
        not isinstance(latent_hw, Sequence)
        or len(latent_hw) != 2
        or not all(_is_int(s) and s >= 1 for s in latent_hw)
    ):
        raise ValueError(f"{op}: latent_hw must be two ints >= 1, got {latent_hw!r}")
    for name, value, low in (("cond_length", cond_length, 1), ("image_size", image_size, 1)):
        if not _is_int(value) or value < low:
            raise ValueError(f"{op}: {name} must be an int >= {low}, got {value!r}")
    if not _is_int(valid_length) or not 1 <= valid_length <= cond_length:
        raise ValueError(
            f"{op}: valid_length must be an int in [1, cond_length={cond_length}], "
            f"got {valid_length!r}"
        )
    height, width = latent_hw
    token = torch.arange(height * width)
    side = image_size // _POS_PATCH
    latent = GridPositions(rows=token // width, cols=token % width, grid=(side, side))

    grid_h, grid_w = image_grid if image_grid is not None else (2 * math.sqrt(cond_length),) * 2
    cond_h, cond_w = smart_resize(
        math.floor(grid_h / 2),
        math.floor(grid_w / 2),
        factor=1,
        min_pixels=1,
        max_pixels=cond_length,
    )
    cond_w = cond_w + math.ceil((valid_length - cond_h * cond_w) / cond_h)
    cell = torch.arange(min(cond_h * cond_w, cond_length))
    rows = torch.zeros(cond_length, dtype=torch.int64)
    cols = torch.zeros(cond_length, dtype=torch.int64)
    # Scaled in float32 and truncated, as the official tensor arithmetic does.
    rows[: cell.numel()] = ((cell // cond_w).float() * cond_pos_scale).long()
    cols[: cell.numel()] = ((cell % cond_w).float() * cond_pos_scale).long()
    return latent, GridPositions(rows=rows, cols=cols, grid=(cond_h, cond_w))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rope_tables(
    rows: torch.Tensor, cols: torch.Tensor, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D RoPE cos, sin: [n, 1, d/2] float32; angles ``[row * f, col * f]``, ``f_i = 10000^(-4i/d)``.

    Positions, frequencies, angles and cos/sin are rounded to the model dtype before the float32 rotation:
    the official arithmetic, whose bf16 angles are coarse (§3.7; the ViT's RoPE does the same).
    """
    half = head_dim // 2
    exponents = torch.arange(0, half, 2, dtype=torch.float32, device=rows.device) / half
    inv_freq = (1.0 / _ROPE_BASE**exponents).to(dtype)
    angles = torch.cat(
        [rows.to(dtype)[:, None] * inv_freq, cols.to(dtype)[:, None] * inv_freq], dim=-1
    )[:, None, :]
    return angles.cos().float(), angles.sin().float()


def _sincos_pos_embed(
    height: int, width: int, dim: int, base_size: int, interpolation: float
) -> torch.Tensor:
    """use_pe: the SANA/PixArt 2-D sin-cos table [h*w, dim] (float64) for a latent grid (§3.7).

    Grid coordinates are scaled by ``base_size / grid`` and ``1 / interpolation`` in float32. The first
    half of the channels encodes the column, the second half the row (the official meshgrid puts w
    first); each half is ``[sin(p * w_k), cos(p * w_k)]`` with ``w_k = 10000^(-k / (dim/4))``.
    """
    grid_h = torch.arange(height, dtype=torch.float32) / (height / base_size) / interpolation
    grid_w = torch.arange(width, dtype=torch.float32) / (width / base_size) / interpolation
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.double()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    cols = grid_w.repeat(height)  # token n = i*w + j holds (row i, col j)
    rows = grid_h.repeat_interleave(width)
    return torch.cat([encode(cols), encode(rows)], dim=1)
