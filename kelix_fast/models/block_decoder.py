"""The Block Decoder (``UnifiedTokenDecoder``, the Next-Block-Prediction head; kelix-ar.md §5).

From the LLM hidden state ``h`` of a position, a small causal transformer emits the next block token by token:
input row 0 is ``h``, row t >= 1 is ``E[s_{t-1}]``; row t predicts slot t. With its own KV cache a block
costs one incremental step per slot instead of recomputing the prefix. Its outputs are scored by the LLM's
final norm and output head (:meth:`KelixLLM.unembed`). Module paths equal the checkpoint keys under
``model.model.token_head.``.
"""

from __future__ import annotations

import torch
from torch import nn

from kelix_fast import ops
from kelix_fast.config import BlockDecoderConfig
from kelix_fast.models.kv_cache import KVCache
from kelix_fast.models.layers import (
    FusedProjections,
    SwiGLU,
    Table,
    fuse_all_projections,
    fused_linear,
)

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm default of the official sa_norm/mlp_norm


class BlockDecoderAttention(FusedProjections):
    """Multi-head causal self-attention with biases and no positional rotation; q/k/v run as one GEMM
    (``qkv``, ``qkv_bias``) once :meth:`fuse_projections` has run."""

    _fusions = (("qkv", "qkv_bias", ("q_proj", "k_proj", "v_proj")),)
    qkv: torch.Tensor | None
    qkv_bias: torch.Tensor | None

    def __init__(self, config: BlockDecoderConfig) -> None:
        super().__init__()
        d = config.d_model
        self.num_heads = config.nhead
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.output_proj = nn.Linear(d, d)

    def forward(self, x, cache: KVCache, layer: int, start: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape
        heads = (n, length, self.num_heads, -1)
        qkv = fused_linear(x, self.qkv, self.qkv_bias)
        q, k, v = (t.view(heads) for t in qkv.split(d, dim=-1))
        cache.write(layer, k, v, start)
        out = ops.cached_attention(
            q, cache.k[layer], cache.v[layer], q_start=start, kv_lens=start + length, causal=True
        )
        return self.output_proj(out.flatten(2))


class BlockDecoderLayer(nn.Module):
    def __init__(self, config: BlockDecoderConfig) -> None:
        super().__init__()
        self.sa_norm = nn.LayerNorm(config.d_model, eps=LAYER_NORM_EPS)
        self.attn = BlockDecoderAttention(config)
        self.mlp_norm = nn.LayerNorm(config.d_model, eps=LAYER_NORM_EPS)
        self.mlp = SwiGLU(config.d_model, config.dim_feedforward)

    def forward(self, x, cache, layer, start) -> torch.Tensor:
        x = x + self.attn(self.sa_norm(x), cache, layer, start)
        return x + self.mlp(self.mlp_norm(x))


class BlockDecoderStack(nn.Module):
    def __init__(self, config: BlockDecoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(BlockDecoderLayer(config) for _ in range(config.num_layers))


class BlockDecoder(nn.Module):
    """``y = output_linear(layers(input_linear(x) + P[pos])) + x`` over rows of [n, T, D] (no final norm)."""

    def __init__(self, config: BlockDecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.input_linear = nn.Linear(config.input_dim, config.d_model)
        self.output_linear = nn.Linear(config.d_model, config.input_dim)
        self.position_embedding = Table(config.max_pos_length, config.d_model)
        self.transformer = BlockDecoderStack(config)

    def process_weights_after_loading(self) -> None:
        """Fuse each layer's q/k/v and gate/up projections (one GEMM each)."""
        fuse_all_projections(self)

    def used_position_rows(self) -> dict[str, tuple[int, int]]:
        """Only rows ``0 .. max_length-1`` of the position table are ever read (``token_head.``-relative)."""
        return {"position_embedding.weight": (0, self.config.max_length)}

    def new_cache(self, n: int) -> KVCache:
        c, weight = self.config, self.input_linear.weight
        return KVCache(
            c.num_layers,
            n,
            c.max_length,
            c.nhead,
            c.head_dim,
            dtype=weight.dtype,
            device=weight.device,
        )

    def forward(self, x: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """Rows x: [n, T, D] at slots ``start .. start+T-1`` of n independent blocks -> y: [n, T, D].

        Earlier slots must already be in ``cache`` (capacity ``max_length``); these rows are appended.
        """
        length = x.shape[1]
        # Slots start .. start + length - 1 of the position table: a view (start is a Python int).
        u = self.input_linear(x) + self.position_embedding.weight[start : start + length]
        start_t = torch.full((x.shape[0],), start, dtype=torch.int64, device=x.device)
        for i, layer in enumerate(self.transformer.layers):
            u = layer(u, cache, i, start_t)
        return self.output_linear(u) + x
