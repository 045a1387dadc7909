"""Kelix-DiT: the customised SANA DiT that turns LLM hidden states into a flow velocity (kelix-dit.md §3).

Module paths equal the official muse ``SanaModel`` checkpoint keys. Every optional feature is read from
config.json and, where it owns weights, checked against the checkpoint keys at load: a disagreement is an
error naming both (the official loader's ``strict=False`` would drop or zero those weights, §8.4).

The work is split by what it depends on, so a sampler pays for each part once:

* per image: :meth:`KelixDiT.connect` (LLM states -> connector space) and :meth:`KelixDiT.prepare_condition`
  (caption MLP, y-norm, every block's cross-attention K/V with their norms and RoPE, the latent RoPE
  tables) -> :class:`DiTCondition`;
* per step: :meth:`KelixDiT.predict_velocity` (timestep embedding, patch embedding, blocks, final layer).

:meth:`KelixDiT.forward` runs both, as the official ``forward(..., is_y_connected=True)`` does.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kelix_fast import ops
from kelix_fast.config import ConfigError, KelixDiTConfig
from kelix_fast.models.layers import rotate_half_rope
from kelix_fast.weights import SafetensorsCheckpoint, load_weights

__all__ = [
    "DEAD_TENSORS",
    "DiTCondition",
    "DiTIntermediates",
    "GridPositions",
    "KelixDiT",
    "dit_position_args",
]

logger = logging.getLogger(__name__)

# A buffer of the official model that the forward never reads: with use_pe off nothing uses it, and with
# use_pe on the official multi-scale model recomputes the table for the actual latent grid (§3.2, §3.7).
DEAD_TENSORS = ("pos_embed",)

_LN_EPS = 1e-6  # the affine-free LayerNorms before modulation and cross_attn_x_norm
_CONNECTOR_EPS = 1e-5  # diffusion_connector's RMSNorm (§3.4)
_CROSS_NORM_EPS = 1e-5  # cross_norm's q/k RMSNorms: fixed, not norm_eps (§3.5.2)
_TIMESTEP_DIM = 256
_MAX_PERIOD = 10000.0
_ROPE_BASE = 10000.0
_POS_PATCH = (
    28  # compute_pos_args: H_x = W_x = image_size // 28, the ViT's merged-patch size (§4.4)
)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- positions


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
) -> tuple[GridPositions, GridPositions]:
    """The official ``compute_pos_args`` of the T2I demo, quirks included (§4.4, golden README "DiT forward").

    The demo passes ``image_grid_thw = [[1, 2*sqrt(Lc), 2*sqrt(Lc)]]``, so the condition grid is
    ``h_c = w_c = floor(sqrt(Lc))`` (``smart_resize`` with factor 1 and ``max_pixels = Lc`` keeps it, since
    ``h_c * w_c <= Lc``). Its width is then corrected to ``w_corr = w_c + ceil((n - h_c*w_c) / h_c)``,
    which shrinks it when ``n < h_c*w_c``; the condition positions are the first ``min(h_c*w_corr, Lc)``
    raster cells of ``h_c x w_corr`` (more than ``n`` when the grid is not full), scaled by
    ``cond_pos_scale`` and truncated, padded with (0, 0) to ``Lc``. ``H_x = W_x = image_size // 28`` (not
    the latent size), ``H_y = h_c``, ``W_y = w_corr``.

    Args:
        latent_hw: ``(h, w)`` latent grid; latent token ``k`` sits at ``(k // w, k % w)``.
        cond_length: Lc, rows of the (padded) condition.
        valid_length: n, valid rows of the condition (``token_embed_lengths[0]``), 1 <= n <= Lc.
        image_size: output image side in pixels.

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

    cond_h = cond_w = math.floor(2 * math.sqrt(cond_length) / 2)
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


# --------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """``(x * rsqrt(mean(x^2) + eps)).to(x.dtype) * weight``, normalised in float32 (§3.4).

    The muse DiT names its weight ``weight`` (``layers.RMSNorm`` uses the LLM's ``scale``).
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=_LN_EPS)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def _conv1x1(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A 1x1 convolution applied to tokens [B, N, C_in] -> [B, N, C_out] (a Linear, no layout copies)."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


class PatchEmbed(nn.Module):
    """``x_embedder``: 1x1 conv C -> D (patch size 1), latents [B, C, h, w] -> tokens [B, h*w, D]."""

    def __init__(self, config: KelixDiTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(config.in_channels, config.hidden_size, kernel_size=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return _conv1x1(latents.flatten(2).transpose(1, 2), self.proj)


class TimestepEmbedder(nn.Module):
    """``t_embedder``: 256-d [cos, sin] sinusoid of the timestep, then Linear, SiLU, Linear (§3.3)."""

    def __init__(self, config: KelixDiTConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.mlp = nn.Sequential(
            nn.Linear(_TIMESTEP_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        """timestep: [B] (already truncated) -> [B, D]."""
        half = _TIMESTEP_DIM // 2
        freqs = torch.exp(
            -math.log(_MAX_PERIOD)
            * torch.arange(half, dtype=torch.float32, device=timestep.device)
            / half
        )
        args = timestep.float()[:, None] * freqs[None]
        embedding = torch.cat([args.cos(), args.sin()], dim=-1)  # cosine half first
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))


class Mlp(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))``: the SANA caption projection ``y_embedder.y_proj``."""

    def __init__(self, dim_in: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """``y_embedder``: the caption MLP and the learned null condition ``y_embedding`` (§3.4).

    ``y_embedding`` [model_max_length, caption_channels] is a buffer of the official model; it is bound
    like a parameter here so the strict loader checks it.
    """

    def __init__(self, config: KelixDiTConfig) -> None:
        super().__init__()
        self.y_embedding = nn.Parameter(
            torch.empty(config.model_max_length, config.caption_channels)
        )
        self.y_proj = Mlp(config.caption_channels, config.hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


class LinearSelfAttention(nn.Module):
    """``attn``: LiteLA, ReLU linear attention over the latent tokens, no mask, no positions (§3.5.1)."""

    def __init__(self, config: KelixDiTConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.head_dim = config.linear_head_dim
        self.to_q = nn.Linear(d, d, bias=False)
        self.to_k = nn.Linear(d, d, bias=False)
        self.to_v = nn.Linear(d, d, bias=False)
        self.proj = nn.Linear(d, d)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.norm_eps)
            self.k_norm = RMSNorm(d, config.norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        if self.qk_norm:  # over the full width, before the head split
            q, k = self.q_norm(q), self.k_norm(k)
        heads = (*x.shape[:2], -1, self.head_dim)
        out = ops.linear_attention(q.view(heads), k.view(heads), v.view(heads))
        return self.proj(out.flatten(2))


class CrossAttention(nn.Module):
    """``cross_attn``: softmax attention of the latents to the condition with the -10000 mask (§3.5.2).

    K and V depend on the condition only: :meth:`keys_values` builds them once per condition.
    """

    def __init__(self, config: KelixDiTConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.q_linear = nn.Linear(d, d)
        self.to_k = nn.Linear(d, d)
        self.to_v = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        if config.cross_norm:
            self.q_norm = RMSNorm(d, _CROSS_NORM_EPS)
            self.k_norm = RMSNorm(d, _CROSS_NORM_EPS)
        self.cross_norm = config.cross_norm

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.num_heads, -1)

    def keys_values(
        self, y: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """y: [B, L, D] -> k, v: [B, L, H, d]; k normed (cross_norm) then rotated (RoPE) like q."""
        k, v = self.to_k(y), self.to_v(y)
        if self.cross_norm:
            k = self.k_norm(k)
        k = self._heads(k)
        if rope is not None:
            k = rotate_half_rope(k, *rope)
        return k, self._heads(v)

    def forward(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        q = self.q_linear(x)
        if self.cross_norm:
            q = self.q_norm(q)
        q = self._heads(q)
        if rope is not None:
            q = rotate_half_rope(q, *rope)
        return self.proj(ops.cross_attention(q, k, v, key_mask).flatten(2))


class ConvLayer(nn.Module):
    """Holds one convolution under ``.conv`` (the official ConvLayer has no norm or act here)."""

    def __init__(self, channels_in: int, channels_out: int, kernel: int, *, bias: bool) -> None:
        super().__init__()
        groups = channels_in if kernel > 1 else 1  # the 3x3 of GLUMBConv is depthwise
        self.conv = nn.Conv2d(
            channels_in, channels_out, kernel, padding=kernel // 2, groups=groups, bias=bias
        )


class GLUMBConv(nn.Module):
    """``mlp``: 1x1 conv + SiLU, depthwise 3x3, ``x * SiLU(gate)``, 1x1 conv without bias (§3.5.3)."""

    def __init__(self, config: KelixDiTConfig) -> None:
        super().__init__()
        d, hidden = config.hidden_size, config.mlp_hidden
        self.inverted_conv = ConvLayer(d, 2 * hidden, 1, bias=True)
        self.depth_conv = ConvLayer(2 * hidden, 2 * hidden, 3, bias=True)
        self.point_conv = ConvLayer(hidden, d, 1, bias=False)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """x: [B, N, D] tokens of an (h, w) grid, raster order -> [B, N, D]."""
        batch, tokens, _ = x.shape
        a = F.silu(_conv1x1(x, self.inverted_conv.conv))
        grid = a.transpose(1, 2).reshape(batch, -1, *hw)  # the 3x3 needs the 2-D layout
        depth = self.depth_conv.conv
        grid = F.conv2d(grid, depth.weight, depth.bias, padding=1, groups=depth.groups)
        a = grid.reshape(batch, -1, tokens).transpose(1, 2)
        u, gate = a.chunk(2, dim=-1)
        return _conv1x1(u * F.silu(gate), self.point_conv.conv)


class DiTBlock(nn.Module):
    """One SANA block: gated LiteLA, ungated cross-attention, gated Mix-FFN (§3.5)."""

    def __init__(self, config: KelixDiTConfig) -> None:
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.empty(6, config.hidden_size))
        self.attn = LinearSelfAttention(config)
        self.cross_attn = CrossAttention(config)
        self.mlp = GLUMBConv(config)
        self.cross_attn_x_norm = config.cross_attn_x_norm

    def forward(
        self,
        x: torch.Tensor,
        t0: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        hw: tuple[int, int],
    ) -> torch.Tensor:
        mod = self.scale_shift_table[None] + t0.view(x.shape[0], 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        x = x + gate_msa * self.attn(_modulate(_layer_norm(x), shift_msa, scale_msa))
        # cross_attn_x_norm normalises the queries only; the residual adds to the raw x (§3.7).
        q_source = _layer_norm(x) if self.cross_attn_x_norm else x
        x = x + self.cross_attn(q_source, k, v, key_mask, rope)
        return x + gate_mlp * self.mlp(_modulate(_layer_norm(x), shift_mlp, scale_mlp), hw)


class FinalLayer(nn.Module):
    """``final_layer``: modulated by the timestep embedding t itself, not t0 (§3.6, quirk 12)."""

    def __init__(self, config: KelixDiTConfig) -> None:
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.empty(2, config.hidden_size))
        self.linear = nn.Linear(config.hidden_size, config.in_channels)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).chunk(2, dim=1)
        return self.linear(_modulate(_layer_norm(x), shift, scale))


# --------------------------------------------------------------------------- condition and outputs


@dataclass(frozen=True)
class DiTCondition:
    """Everything of a batch of conditions that does not depend on the sampling step.

    Build with :meth:`KelixDiT.prepare_condition`; join branches (e.g. ``[null, cond]`` for CFG) with
    :meth:`concat`.

    Attributes:
        y_embedded: [B, L, D] caption MLP output (``y_embedder``).
        y: [B, L, D] ``attention_y_norm`` output, the source of every block's K and V.
        key_mask: [B, L] bool, True = valid condition row.
        keys, values: one [B, L, H, d] tensor per block (K normed and rotated as the block needs).
        latent_rope: the latents' cross-attention RoPE tables (cos, sin [N, 1, d/2] float32), or None
            when ``use_cross_attn_rope`` is off (then any latent size works).
    """

    y_embedded: torch.Tensor
    y: torch.Tensor
    key_mask: torch.Tensor
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    latent_rope: tuple[torch.Tensor, torch.Tensor] | None

    @property
    def batch_size(self) -> int:
        return self.key_mask.shape[0]

    @classmethod
    def concat(cls, conditions: Sequence[DiTCondition]) -> DiTCondition:
        """Stack conditions along the batch; all must have the same length L and latent RoPE tables."""
        if not conditions:
            raise ValueError("DiTCondition.concat: conditions must not be empty, got 0")
        first = conditions[0]
        for i, c in enumerate(conditions[1:], start=1):
            if c.key_mask.shape[1] != first.key_mask.shape[1]:
                raise ValueError(
                    f"DiTCondition.concat: conditions[{i}] must have length "
                    f"{first.key_mask.shape[1]} like conditions[0], got {c.key_mask.shape[1]}"
                )
            same_rope = (c.latent_rope is None) == (first.latent_rope is None) and (
                c.latent_rope is None
                or all(torch.equal(a, b) for a, b in zip(c.latent_rope, first.latent_rope))
            )
            if not same_rope:
                raise ValueError(
                    f"DiTCondition.concat: conditions[{i}] must share the latent positions of "
                    "conditions[0]"
                )

        def cat(name: str) -> torch.Tensor:
            return torch.cat([getattr(c, name) for c in conditions])

        return cls(
            y_embedded=cat("y_embedded"),
            y=cat("y"),
            key_mask=cat("key_mask"),
            keys=tuple(torch.cat(ks) for ks in zip(*(c.keys for c in conditions))),
            values=tuple(torch.cat(vs) for vs in zip(*(c.values for c in conditions))),
            latent_rope=first.latent_rope,
        )


@dataclass(frozen=True)
class DiTIntermediates:
    """The official hook captures of one forward (golden ``dit_forward``).

    Attributes:
        t_emb: [B, D] ``t_embedder`` output. t_block: [B, 6D] ``t_block`` output (t0).
        y_embedder_out, y_normed: [B, L, D] (from the condition).
        blocks: one [B, h*w, D] output per block.
    """

    t_emb: torch.Tensor
    t_block: torch.Tensor
    y_embedder_out: torch.Tensor
    y_normed: torch.Tensor
    blocks: tuple[torch.Tensor, ...]


# --------------------------------------------------------------------------- the model


class KelixDiT(nn.Module):
    """Kelix-DiT. Build with :meth:`from_pretrained` (an official checkpoint directory)."""

    def __init__(self, config: KelixDiTConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.x_embedder = PatchEmbed(config)
        self.t_embedder = TimestepEmbedder(config)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        if config.use_connector:
            self.diffusion_connector = nn.Sequential(
                nn.Linear(config.connector_channels, config.caption_channels),
                nn.GELU(approximate="tanh"),
                nn.Linear(config.caption_channels, config.caption_channels),
                RMSNorm(config.caption_channels, _CONNECTOR_EPS),
            )
        self.y_embedder = CaptionEmbedder(config)
        if config.y_norm:
            self.attention_y_norm = RMSNorm(d, config.norm_eps)
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.depth))
        self.final_layer = FinalLayer(config)
        self._pos_embed: dict[tuple[int, int], torch.Tensor] = {}  # use_pe tables per latent grid

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        model_max_length: int | None = None,
    ) -> KelixDiT:
        """Load an official Kelix-DiT directory (muse ``config.json`` + ``*.safetensors``).

        Args:
            device: default CUDA when available, else CPU.
            dtype: default bfloat16 on CUDA, float32 on CPU; weights are cast once at load.
            model_max_length: overrides config.json's value, which must equal the rows of
                ``y_embedder.y_embedding`` (the release says 300 but stores 720; the demo passes 720).

        Raises:
            ConfigError: unsupported config, or config and checkpoint disagree on a feature.
            WeightsMismatchError: missing, unexpected or mis-shaped tensors.
        """
        config = KelixDiTConfig.from_json(path)
        return cls.from_weights(
            config,
            SafetensorsCheckpoint(path),
            device=device,
            dtype=dtype,
            model_max_length=model_max_length,
        )

    @classmethod
    def from_weights(
        cls,
        config: KelixDiTConfig,
        weights: SafetensorsCheckpoint | Mapping[str, torch.Tensor],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        model_max_length: int | None = None,
    ) -> KelixDiT:
        """Like :meth:`from_pretrained` with a parsed config and tensors under the official key names."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if dtype not in _DTYPES:
            raise ValueError(f"KelixDiT: dtype must be float32, bfloat16 or float16, got {dtype}")
        if model_max_length is not None:
            config = config.with_model_max_length(model_max_length)
        if isinstance(weights, SafetensorsCheckpoint):
            shapes = {key: weights.shape(key) for key in weights}
        else:
            shapes = {key: tuple(t.shape) for key, t in weights.items()}
        _check_features(config, shapes, overridden=model_max_length is not None)
        with torch.device("meta"):
            model = cls(config)
        load_weights(model, weights, dead=DEAD_TENSORS, device=device, dtype=dtype)
        model.eval()
        logger.info(
            "kelix_fast: loaded Kelix-DiT on %s in %s (depth %d, qk_norm=%s, cross_norm=%s, "
            "cross-attn RoPE=%s, position scale=%s, x-norm=%s, use_pe=%s, connector=%s, "
            "model_max_length=%d; dead tensors dropped: %s)",
            device,
            str(dtype).removeprefix("torch."),
            config.depth,
            config.qk_norm,
            config.cross_norm,
            config.use_cross_attn_rope,
            config.use_position_scale,
            config.cross_attn_x_norm,
            config.use_pe,
            config.use_connector,
            config.model_max_length,
            ", ".join(DEAD_TENSORS),
        )
        return model

    # ------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        return self.x_embedder.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    # ------------------------------------------------------------------ condition (once per image)

    @torch.inference_mode()
    def connect(self, hidden: torch.Tensor) -> torch.Tensor:
        """LLM hidden states -> connector space (§3.4), applied once, outside the sampling loop.

        ``Linear -> GELU(tanh) -> Linear -> RMSNorm(eps 1e-5)``; the identity when the checkpoint has no
        connector (``use_connector`` false).

        Args:
            hidden: [B, Lc, connector_channels] in the model dtype and device (padding rows may be
                anything; they stay masked).

        Returns:
            [B, Lc, caption_channels].
        """
        c = self.config
        width = c.connector_channels if c.use_connector else c.caption_channels
        self._check_tensor("hidden", hidden, (None, None, width), "B, Lc, connector_channels")
        if not c.use_connector:
            return hidden
        return self.diffusion_connector(hidden)

    @torch.inference_mode()
    def null_condition(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The CFG null condition of ``length`` rows (golden README "Sampling" step 2).

        Rows ``y_embedding[:min(model_max_length, length)]``, zero padded to ``length``; the mask is 1 on
        those rows and 0 on the padding. It lives in connector space: do not :meth:`connect` it.

        Returns:
            (cond [1, length, caption_channels] in the model dtype, mask [1, length] bool).
        """
        if not _is_int(length) or length < 1:
            raise ValueError(f"KelixDiT: length must be an int >= 1, got {length!r}")
        table = self.y_embedder.y_embedding
        rows = min(length, table.shape[0])
        cond = torch.zeros(1, length, table.shape[1], dtype=table.dtype, device=table.device)
        cond[0, :rows] = table[:rows]
        mask = torch.zeros(1, length, dtype=torch.bool, device=table.device)
        mask[0, :rows] = True
        return cond, mask

    @torch.inference_mode()
    def prepare_condition(
        self,
        cond: torch.Tensor,
        cond_mask: torch.Tensor,
        *,
        cond_positions: GridPositions | None = None,
        latent_positions: GridPositions | None = None,
    ) -> DiTCondition:
        """Everything of the forward that depends on the condition only: once per image, not per step.

        Caption MLP, ``attention_y_norm``, and per block K and V (``to_k``/``to_v``, cross_norm, RoPE),
        plus the latent RoPE tables.

        Args:
            cond: [B, L, caption_channels], already connected (:meth:`connect` or
                :meth:`null_condition`), model dtype and device.
            cond_mask: [B, L] bool or 0/1 numbers, 1 = valid row; at most ``model_max_length`` valid
                rows per sample.
            cond_positions, latent_positions: from :func:`dit_position_args`; required when
                ``use_cross_attn_rope`` is on, ignored otherwise (the official code computes them
                anyway and never reads them).
        """
        c = self.config
        batch, length = self._check_tensor(
            "cond", cond, (None, None, c.caption_channels), "B, L, caption_channels"
        )[:2]
        key_mask = self._check_mask(cond_mask, batch, length)
        rope = latent_rope = None
        if c.use_cross_attn_rope:
            if cond_positions is None or latent_positions is None:
                raise ValueError(
                    "KelixDiT: cond_positions and latent_positions must be given when "
                    "use_cross_attn_rope is on (see dit_position_args), got None"
                )
            self._check_positions("cond_positions", cond_positions, length)
            self._check_positions("latent_positions", latent_positions, None)
            rows, cols = cond_positions.rows.to(self.device), cond_positions.cols.to(self.device)
            if c.use_position_scale:
                # Condition rows/cols are stretched to the latent grid, in float32 and truncated (§3.7).
                (h_x, w_x), (h_y, w_y) = latent_positions.grid, cond_positions.grid
                rows = (rows.float() * max(1.0, h_x / h_y)).long()
                cols = (cols.float() * max(1.0, w_x / w_y)).long()
            rope = _rope_tables(rows, cols, c.cross_head_dim, self.dtype)
            latent_rope = _rope_tables(
                latent_positions.rows.to(self.device),
                latent_positions.cols.to(self.device),
                c.cross_head_dim,
                self.dtype,
            )
        y_embedded = self.y_embedder(cond)
        y = self.attention_y_norm(y_embedded) if c.y_norm else y_embedded
        kv = [block.cross_attn.keys_values(y, rope) for block in self.blocks]
        return DiTCondition(
            y_embedded=y_embedded,
            y=y,
            key_mask=key_mask,
            keys=tuple(k for k, _ in kv),
            values=tuple(v for _, v in kv),
            latent_rope=latent_rope,
        )

    # ------------------------------------------------------------------ denoising (per step)

    @torch.inference_mode()
    def predict_velocity(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        condition: DiTCondition,
        *,
        return_intermediates: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, DiTIntermediates]:
        """One DiT evaluation on a prepared condition: the flow velocity ``v ~ noise - x0`` (§3.6).

        Args:
            latents: [B, in_channels, h, w], model dtype and device.
            timestep: [B] on the model device (float32 in the sampler); truncated to an integer, as the
                official ``timestep.long()`` does (937.5 -> 937).
            condition: from :meth:`prepare_condition` with batch B (and, with cross-attention RoPE,
                latent positions of h*w tokens).
            return_intermediates: also return the official hook captures.

        Returns:
            [B, in_channels, h, w] in the model dtype, or ``(velocity, DiTIntermediates)``.
        """
        c = self.config
        if not isinstance(condition, DiTCondition):
            raise TypeError(
                f"KelixDiT: condition must be a DiTCondition (see prepare_condition), "
                f"got {type(condition).__name__}"
            )
        batch, _, height, width = self._check_tensor(
            "latents", latents, (condition.batch_size, c.in_channels, None, None), "B, C, h, w"
        )
        tokens = height * width
        if condition.latent_rope is not None and condition.latent_rope[0].shape[0] != tokens:
            raise ValueError(
                f"KelixDiT: latents must have h*w = {condition.latent_rope[0].shape[0]} tokens "
                f"(the latent_positions of the condition), got {height}x{width}"
            )
        if not isinstance(timestep, torch.Tensor):
            raise TypeError(
                f"KelixDiT: timestep must be a torch.Tensor, got {type(timestep).__name__}"
            )
        if timestep.shape != (batch,) or timestep.is_complex() or timestep.dtype == torch.bool:
            raise ValueError(
                f"KelixDiT: timestep must be a real tensor of shape [{batch}], "
                f"got {timestep.dtype} {list(timestep.shape)}"
            )
        if timestep.device != self.device:
            raise ValueError(f"KelixDiT: timestep must be on {self.device}, got {timestep.device}")

        t_emb = self.t_embedder(timestep.long())
        t0 = self.t_block(t_emb)
        x = self.x_embedder(latents)
        if c.use_pe:
            x = x + self._latent_pos_embed(height, width)
        outputs = []
        for block, k, v in zip(self.blocks, condition.keys, condition.values):
            x = block(x, t0, k, v, condition.key_mask, condition.latent_rope, (height, width))
            if return_intermediates:
                outputs.append(x)
        out = self.final_layer(x, t_emb).transpose(1, 2).reshape(batch, -1, height, width)
        if not return_intermediates:
            return out
        return out, DiTIntermediates(
            t_emb=t_emb,
            t_block=t0,
            y_embedder_out=condition.y_embedded,
            y_normed=condition.y,
            blocks=tuple(outputs),
        )

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: torch.Tensor,
        cond_mask: torch.Tensor,
        *,
        cond_positions: GridPositions | None = None,
        latent_positions: GridPositions | None = None,
        return_intermediates: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, DiTIntermediates]:
        """The official forward with ``is_y_connected=True``: :meth:`prepare_condition` then
        :meth:`predict_velocity`. A sampler should prepare once and call ``predict_velocity`` per step.

        Shapes as in those two methods: latents [B, C, h, w], timestep [B], cond [B, L,
        caption_channels] (connected), cond_mask [B, L] -> [B, C, h, w].
        """
        condition = self.prepare_condition(
            cond, cond_mask, cond_positions=cond_positions, latent_positions=latent_positions
        )
        return self.predict_velocity(
            latents, timestep, condition, return_intermediates=return_intermediates
        )

    # ------------------------------------------------------------------ helpers

    def _latent_pos_embed(self, height: int, width: int) -> torch.Tensor:
        """use_pe table [h*w, D] in the model dtype, built once per latent grid (§3.7)."""
        table = self._pos_embed.get((height, width))
        if table is None:
            c = self.config
            table = _sincos_pos_embed(
                height, width, c.hidden_size, c.input_size, c.pe_interpolation
            ).to(device=self.device, dtype=self.dtype)
            self._pos_embed[(height, width)] = table
        return table

    def _check_tensor(
        self, name: str, t: object, expected: tuple[int | None, ...], dims: str
    ) -> tuple[int, ...]:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"KelixDiT: {name} must be a torch.Tensor, got {type(t).__name__}")
        ok = t.dim() == len(expected) and all(
            e is None or e == s for e, s in zip(expected, t.shape)
        )
        if not ok:
            want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
            raise ValueError(
                f"KelixDiT: {name} must have shape {want} ({dims}), got {list(t.shape)}"
            )
        if t.dtype != self.dtype:
            raise ValueError(
                f"KelixDiT: {name} must have the model dtype {self.dtype}, got {t.dtype}"
            )
        if t.device != self.device:
            raise ValueError(f"KelixDiT: {name} must be on {self.device}, got {t.device}")
        return tuple(t.shape)

    def _check_mask(self, mask: object, batch: int, length: int) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(
                f"KelixDiT: cond_mask must be a torch.Tensor, got {type(mask).__name__}"
            )
        if tuple(mask.shape) != (batch, length):
            raise ValueError(
                f"KelixDiT: cond_mask must have shape [{batch}, {length}] (B, L of cond), "
                f"got {list(mask.shape)}"
            )
        if mask.device != self.device:
            raise ValueError(f"KelixDiT: cond_mask must be on {self.device}, got {mask.device}")
        if mask.is_complex() or bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("KelixDiT: cond_mask must hold only 0/1 (or bool) values")
        key_mask = mask != 0
        longest = int(key_mask.sum(dim=1).max()) if batch else 0
        limit = self.config.model_max_length
        if longest > limit:
            raise ValueError(
                f"KelixDiT: cond must have at most model_max_length={limit} valid rows, "
                f"got {longest}"
            )
        return key_mask

    @staticmethod
    def _check_positions(name: str, positions: object, length: int | None) -> None:
        if not isinstance(positions, GridPositions):
            raise TypeError(
                f"KelixDiT: {name} must be a GridPositions (see dit_position_args), "
                f"got {type(positions).__name__}"
            )
        rows, cols = positions.rows, positions.cols
        shape_ok = (
            isinstance(rows, torch.Tensor)
            and isinstance(cols, torch.Tensor)
            and rows.dim() == 1
            and rows.shape == cols.shape
            and rows.dtype == cols.dtype == torch.int64
        )
        if not shape_ok or (length is not None and rows.shape[0] != length):
            want = f"[{length}]" if length is not None else "[n]"
            got = [getattr(t, "shape", type(t).__name__) for t in (rows, cols)]
            raise ValueError(
                f"KelixDiT: {name}.rows and .cols must be int64 tensors of shape {want}, got {got}"
            )
        if len(positions.grid) != 2 or not all(_is_int(g) and g >= 1 for g in positions.grid):
            raise ValueError(f"KelixDiT: {name}.grid must be two ints >= 1, got {positions.grid!r}")


def _check_features(
    config: KelixDiTConfig, shapes: Mapping[str, tuple[int, ...]], *, overridden: bool
) -> None:
    """Config and checkpoint must agree on every feature that owns weights (§8.5)."""
    features = (
        ("qk_norm", config.qk_norm, "blocks.0.attn.q_norm.weight"),
        ("cross_norm", config.cross_norm, "blocks.0.cross_attn.q_norm.weight"),
        ("y_norm", config.y_norm, "attention_y_norm.weight"),
        ("use_connector", config.use_connector, "diffusion_connector.0.weight"),
    )
    for name, enabled, key in features:
        if enabled != (key in shapes):
            flag = "true" if enabled else "false"
            relation = "lacks" if enabled else "has"
            raise ConfigError(f"KelixDiT: config {name}={flag} but the checkpoint {relation} {key}")
    connector = shapes.get("diffusion_connector.0.weight")
    if connector is not None and len(connector) == 2 and connector[1] != config.connector_channels:
        raise ConfigError(
            f"KelixDiT: config connector_channels={config.connector_channels} but the checkpoint's "
            f"diffusion_connector.0.weight has {connector[1]} input columns"
        )
    table = shapes.get("y_embedder.y_embedding")
    if table is not None and len(table) == 2 and table[0] != config.model_max_length:
        source = "override" if overridden else "config.json"
        raise ConfigError(
            f"KelixDiT: model_max_length={config.model_max_length} ({source}) but the checkpoint's "
            f"y_embedder.y_embedding has {table[0]} rows; pass model_max_length={table[0]} "
            "(the official demo overrides it)"
        )
