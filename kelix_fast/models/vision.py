"""NaViT vision encoder of Kelix-Tok (``KeyeVisionModel``, kelix-ar.md §3.2).

Images of different sizes are packed into one sequence; attention is bidirectional within each image and
never crosses images (the release's flash-attn varlen semantics, golden README quirk 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kelix_fast import ops
from kelix_fast.config import VisionConfig
from kelix_fast.models.layers import Table


class VisionEmbeddings(nn.Module):
    """Patch embedding (a stride-p conv, computed as a Linear over the flattened patch) + learned positions."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        c, p, hidden = config.num_channels, config.patch_size, config.hidden_size
        self.patch_embedding = nn.Conv2d(c, hidden, kernel_size=p, stride=p)
        self.position_embedding = Table(config.position_grid**2, hidden)

    def forward(
        self, pixel_values: torch.Tensor, grids: Sequence[tuple[int, int, int]]
    ) -> torch.Tensor:
        """pixel_values: [Np, C, p, p] -> [Np, hidden] in the weights' dtype."""
        weight = self.patch_embedding.weight
        x = F.linear(
            pixel_values.to(weight.dtype).reshape(pixel_values.shape[0], -1),
            weight.reshape(weight.shape[0], -1),
            self.patch_embedding.bias,
        )
        return x + torch.cat([self._positions(h, w).repeat(t, 1) for t, h, w in grids])

    def _positions(self, height: int, width: int) -> torch.Tensor:
        """The square position table resized to ``height x width`` (bilinear, align_corners=False), raster."""
        side = self.config.position_grid
        table = self.position_embedding.weight.reshape(side, side, -1).permute(2, 0, 1)[None]
        resized = F.interpolate(table, size=(height, width), mode="bilinear", align_corners=False)
        return resized[0].flatten(1).T


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.output_proj = nn.Linear(hidden, hidden)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen: int) -> torch.Tensor:
        heads = (x.shape[0], self.num_heads, -1)
        q = ops.rotate_half_rope(self.q_proj(x).view(heads), cos, sin)
        k = ops.rotate_half_rope(self.k_proj(x).view(heads), cos, sin)
        v = self.v_proj(x).view(heads)
        out = ops.attention(
            q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, mask="bidirectional"
        )
        return self.output_proj(out.flatten(1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class VisionLayer(nn.Module):
    """Pre-LN encoder layer: ``x += attn(LN1 x)``, ``x += mlp(LN2 x)``."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.sa_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = VisionAttention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen: int) -> torch.Tensor:
        x = x + self.attn(self.sa_norm(x), cos, sin, cu_seqlens, max_seqlen)
        return x + self.mlp(self.mlp_norm(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))


class VisionTransformer(nn.Module):
    """Patches of several images -> per-patch features after ``ln_post``.

    Module paths equal the checkpoint keys under ``visual_tokenizer.visual.``.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.ln_post = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, pixel_values: torch.Tensor, grids: Sequence[tuple[int, int, int]]
    ) -> torch.Tensor:
        """pixel_values: [Np, C, p, p] (images in ``grids`` order, raster) -> [Np, hidden].

        grids: one ``(t, h, w)`` per image, ``sum(t*h*w) == Np`` (validated by the caller).
        """
        x = self.embeddings(pixel_values, grids)
        cos, sin = self._rope(grids, x.dtype, x.device)
        sizes = [t * h * w for t, h, w in grids]
        cu_seqlens = torch.tensor([0, *sizes], device=x.device).cumsum(0)
        # cu_seqlens and max_seqlen come from the validated grids: the attention op need not read
        # cu_seqlens back to the host to check them in every layer (a device sync each).
        max_seqlen = max(sizes)
        with ops.trusted_values():
            for layer in self.encoder.layers:
                x = layer(x, cos, sin, cu_seqlens, max_seqlen)
        return self.ln_post(x)

    def _rope(self, grids, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        """2-D RoPE tables [Np, 1, d/2] (float32), angles ``[row * f, col * f]``, ``f_i = theta^(-4i/d)``.

        Positions, frequencies and angles are rounded to the model dtype and cos/sin taken in it before the
        float32 rotation: the official arithmetic, whose bf16 angles are coarse (kelix-ar.md §3.2, quirk).
        """
        head_dim = self.config.head_dim
        exponents = torch.arange(0, head_dim // 2, 2, dtype=torch.float32, device=device) / (
            head_dim // 2
        )
        inv_freq = (1.0 / self.config.rope_theta**exponents).to(dtype)
        rows, cols = [], []
        for t, h, w in grids:
            pid = torch.arange(h * w, device=device).repeat(t)
            rows.append(pid // w)
            cols.append(pid % w)
        row = torch.cat(rows).to(dtype)[:, None] * inv_freq
        col = torch.cat(cols).to(dtype)[:, None] * inv_freq
        angles = torch.cat([row, col], dim=-1)[:, None, :]  # [Np, 1 (heads), d/2]
        return angles.cos().float(), angles.sin().float()
