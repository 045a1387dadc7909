"""The unified Qwen3 LLM of Kelix (kelix-ar.md §4): block embedding, Qwen3 layers, final norm, output head.

One LLM position per block. Layers: QK-RMSNorm before a float32 rotate-half RoPE (``rope_base``), GQA with
a KV cache of the KV heads only, SwiGLU. Module paths equal the checkpoint keys under ``model.model.``.
"""

from __future__ import annotations

import torch
from torch import nn

from kelix_fast import ops
from kelix_fast.config import LLMConfig
from kelix_fast.models.kv_cache import KVCache
from kelix_fast.models.layers import (
    FusedProjections,
    RMSNorm,
    SwiGLU,
    Table,
    fuse_all_projections,
    fused_linear,
)


def rope_tables(
    length: int, head_dim: int, base: float, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [length, head_dim/2] float32 for positions 0..length-1, ``f_j = base^(-2j/d)``."""
    inv_freq = 1.0 / base ** (
        torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    )
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


class Qwen3Attention(FusedProjections):
    """GQA self-attention; q/k/v run as one GEMM (``qkv``) once :meth:`fuse_projections` has run."""

    _fusions = (("qkv", None, ("q_proj", "k_proj", "v_proj")),)
    qkv: torch.Tensor | None

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        d, hd = config.embed_dim, config.head_dim
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.qkv_sizes = (config.num_heads * hd, config.num_kv_heads * hd, config.num_kv_heads * hd)
        self.q_proj = nn.Linear(d, config.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, config.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, config.num_kv_heads * hd, bias=False)
        self.output_proj = nn.Linear(config.num_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, config.norm_eps)
        self.k_norm = RMSNorm(hd, config.norm_eps)

    def forward(
        self, x, cos, sin, cache: KVCache, layer: int, q_start, kv_lens, fresh_seqlens
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = fused_linear(x, self.qkv, None).split(self.qkv_sizes, dim=-1)
        # QK-norm and RoPE in one pass per tensor (ops.rms_norm with rope), reading the heads in place.
        q = q.view(batch, length, self.num_heads, -1)
        k = k.view(batch, length, self.num_kv_heads, -1)
        q = ops.rms_norm(q, self.q_norm.scale, eps=self.q_norm.eps, rope_cos=cos, rope_sin=sin)
        k = ops.rms_norm(k, self.k_norm.scale, eps=self.k_norm.eps, rope_cos=cos, rope_sin=sin)
        v = v.view(batch, length, self.num_kv_heads, -1)
        cache.write(layer, k, v, q_start)
        if fresh_seqlens is None:
            out = ops.cached_attention(
                q, cache.k[layer], cache.v[layer], q_start=q_start, kv_lens=kv_lens, causal=True
            )
        else:
            # A prefill into an empty cache attends to its own new keys only: the flash kernel over the
            # batch as a pack of padded rows (causal, so a real row never sees its padding).
            out = ops.attention(
                q.flatten(0, 1),
                k.flatten(0, 1),
                v.flatten(0, 1),
                cu_seqlens=fresh_seqlens,
                max_seqlen=length,
                mask="causal",
            ).view_as(q)
        return self.output_proj(out.flatten(2))


class Qwen3Layer(nn.Module):
    """``h = h + attn(sa_norm(h)); h = h + mlp(mlp_norm(h))``, with each residual add fused into the
    norm that follows it (``ops.add_rms_norm``): the layer takes and returns the stream as a pair
    ``(x, residual)`` whose sum is ``h`` (``residual`` None: ``h = x``), as vLLM's layers do, so the
    add of one layer's MLP output happens inside the next layer's first norm."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.sa_norm = RMSNorm(config.embed_dim, config.norm_eps)
        self.attn = Qwen3Attention(config)
        self.mlp_norm = RMSNorm(config.embed_dim, config.norm_eps)
        self.mlp = SwiGLU(config.embed_dim, config.intermediate_dim)

    def forward(
        self, x, residual, cos, sin, cache, layer, q_start, kv_lens, fresh_seqlens
    ) -> tuple[torch.Tensor, torch.Tensor]:
        norm = self.sa_norm
        if residual is None:
            h, residual = norm(x), x
        else:
            h, residual = ops.add_rms_norm(x, residual, norm.scale, eps=norm.eps)
        h = self.attn(h, cos, sin, cache, layer, q_start, kv_lens, fresh_seqlens)
        h, residual = ops.add_rms_norm(h, residual, self.mlp_norm.scale, eps=self.mlp_norm.eps)
        return self.mlp(h), residual


class TokenEmbeddings(nn.Module):
    """The shared text + visual table ``E [V, D]`` (``tok_embeddings.embed_tokens``)."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.embed_tokens = Table(config.total_vocab, config.embed_dim)


class KelixLLM(nn.Module):
    """Groups -> last-layer hidden states (before the final norm); :meth:`unembed` scores Block Decoder rows."""

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = TokenEmbeddings(config)
        self.layers = nn.ModuleList(Qwen3Layer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.embed_dim, config.norm_eps)
        self.output = nn.Linear(config.embed_dim, config.total_vocab, bias=False)

    def process_weights_after_loading(self) -> None:
        """Fuse each layer's q/k/v and gate/up projections (one GEMM each) and build the RoPE tables
        (float32, ``max_seq_len`` positions) on the weights' device."""
        fuse_all_projections(self)
        c = self.config
        cos, sin = rope_tables(c.max_seq_len, c.head_dim, c.rope_base, self.norm.scale.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        c, weight = self.config, self.norm.scale
        return KVCache(
            c.num_layers,
            batch,
            capacity,
            c.num_kv_heads,
            c.head_dim,
            dtype=weight.dtype,
            device=weight.device,
        )

    def embed(self, groups: torch.Tensor) -> torch.Tensor:
        """groups: [B, L, G+1] int64 -> [B, L, D] (kelix-ar.md §4.4)."""
        c = self.config
        return ops.block_embed(
            groups,
            self.tok_embeddings.embed_tokens.weight,
            q_eos=c.q_eos_token,
            text_vocab=c.vocab_size,
        )

    def slot_embeddings(self, groups: torch.Tensor) -> torch.Tensor:
        """Per-slot embeddings before the masked sum: [B, L, G+1] -> [B, L, G, D] (teacher forcing).

        Visual group: ``E[g_j]``; text group: ``E[g_0]`` in every slot (kelix-ar.md §5.3).
        """
        slots = groups[..., :-1]
        rows = torch.where(slots[..., :1] >= self.config.vocab_size, slots, slots[..., :1])
        return self.tok_embeddings.embed_tokens.weight[rows]

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache,
        q_start: torch.Tensor,
        kv_lens: torch.Tensor,
        *,
        output_hidden_states: bool = False,
        fresh: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Run the layers on embeddings x: [B, T, D] at positions ``q_start[b] + i``, filling ``cache``.

        ``fresh``: the caller promises ``q_start == 0`` and a cache holding nothing yet of these rows (a
        prefill): attention then reads the new keys directly (``ops.attention``, causal over the padded
        rows, whose results past ``kv_lens[b]`` are garbage the caller ignores, as always) instead of
        the cache.

        Returns the last layer's output [B, T, D] (before the final norm) and, if asked, every layer's
        input plus that output (``num_layers + 1`` tensors, as the official ``hidden_states``).
        """
        pos = q_start[:, None] + torch.arange(x.shape[1], device=x.device)  # [B, T]
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # [B, T, d/2]
        states = [x] if output_hidden_states else None
        batch, length = x.shape[:2]
        fresh_seqlens = (
            torch.arange(0, batch * length + 1, length, device=x.device)
            if fresh and length
            else None
        )
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, cos, sin, cache, i, q_start, kv_lens, fresh_seqlens)
            if states is not None:
                states.append(x + residual)
        return (x if residual is None else x + residual), states

    def unembed(self, y: torch.Tensor) -> torch.Tensor:
        """Block Decoder outputs [..., D] -> logits [..., V] = output(RMSNorm_final(y)) (kelix-ar.md §4.6)."""
        return self.output(self.norm(y))
