"""Kelix-DiT layers: the embedders, attentions, Mix-FFN, SANA block and final layer (kelix-dit.md §3.3-§3.6).

Module paths inside each layer equal the official muse ``SanaModel`` checkpoint keys below the name
:class:`~kelix_fast.models.dit.KelixDiT` binds it to (``x_embedder``, ``blocks.<i>``, ``final_layer``, ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kelix_fast import ops
from kelix_fast.config import KelixDiTConfig
from kelix_fast.models.layers import FusedProjections, fused_linear

_LN_EPS = 1e-6  # the affine-free LayerNorms before modulation and cross_attn_x_norm
_CROSS_NORM_EPS = 1e-5  # cross_norm's q/k RMSNorms: fixed, not norm_eps (§3.5.2)
_TIMESTEP_DIM = 256
_MAX_PERIOD = 10000.0


class RMSNorm(nn.Module):
    """``(x * rsqrt(mean(x^2) + eps)).to(x.dtype) * weight``, normalised in float32 (§3.4).

    The muse DiT names its weight ``weight`` (``layers.RMSNorm`` uses the LLM's ``scale``).
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, eps=self.eps)


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


class LinearSelfAttention(FusedProjections):
    """``attn``: LiteLA, ReLU linear attention over the latent tokens, no mask, no positions (§3.5.1).

    q/k/v run as one GEMM (``qkv``, [3D, D]) once :meth:`fuse_projections` has run: one launch and
    three times the output tiles of a [L, D] x [D, D] GEMM, which at 1024 px (1,024 tokens per image,
    D = 2,240) has 72 tiles of 128 x 256 for an H100/H200's 132 SMs.
    """

    _fusions = (("qkv", None, ("to_q", "to_k", "to_v")),)
    qkv: torch.Tensor | None

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
        q, k, v = fused_linear(x, self.qkv, None).split(x.shape[-1], dim=-1)
        if self.qk_norm:  # over the full width, before the head split
            q, k = self.q_norm(q), self.k_norm(k)
        heads = (*x.shape[:2], -1, self.head_dim)  # per-head views: the op takes any strides
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
            k = ops.rotate_half_rope(k, *rope)
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
            q = ops.rotate_half_rope(q, *rope)
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
