"""``attention``: softmax attention over packed variable-length sequences (ViT images, prompts).

Only the PyTorch reference exists so far (the flash kernel comes with the attention issue). GQA without
expanding K/V: query head ``h`` reads KV head ``h // (H / Hkv)``; scores and softmax are float32. The
shared checks and the masked softmax reference also serve :mod:`kelix_fast.ops.cached_attention`.
"""

from __future__ import annotations

import itertools
import math

import torch

from kelix_fast.ops import _checks, _dispatch

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor,
    causal: bool,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention within each packed sequence: ``o = softmax(q k^T * scale + mask) v``.

    Sequence ``i`` is rows ``cu_seqlens[i]:cu_seqlens[i+1]``; nothing attends across sequences (several ViT
    images in one call). ``causal=False`` is bidirectional within a sequence.

    Args:
        q: [T, H, d]; k, v: [T, Hkv, d], same dtype (float32/bfloat16/float16) and device; H % Hkv == 0.
        cu_seqlens: [n+1] int32/int64, non-decreasing, from 0 to T (empty sequences allowed).
        scale: softmax scale, default ``d ** -0.5``.

    Returns:
        [T, H, d] in the dtype of ``q``.
    """
    op = "attention"
    _check_qkv(op, q, k, v, packed=True)
    _checks.tensor(op, "cu_seqlens", cu_seqlens)
    _checks.shape(op, "cu_seqlens", cu_seqlens, (None,), "num_seqs + 1")
    _checks.dtype(op, "cu_seqlens", cu_seqlens, (torch.int32, torch.int64))
    bounds = cu_seqlens.tolist()
    if (
        not bounds
        or bounds[0] != 0
        or bounds[-1] != q.shape[0]
        or any(a > b for a, b in itertools.pairwise(bounds))
    ):
        raise ValueError(
            f"{op}: cu_seqlens must be non-decreasing from 0 to T={q.shape[0]}, got {bounds[:8]}"
            f"{'...' if len(bounds) > 8 else ''}"
        )
    out = torch.empty_like(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    _dispatch.pick(op, _ATTENTION_IMPLS, backend, q, k, v).run(q, k, v, bounds, causal, scale, out)
    return out


def _check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, packed: bool) -> None:
    dims = "T, H, d" if packed else "B, L, H, d"
    kv_dims = "T, Hkv, d" if packed else "B, S, Hkv, d"
    rank = 3 if packed else 4
    _checks.shape(op, "q", q, (None,) * rank, dims)
    lead = (q.shape[0],) if packed else (q.shape[0], None)
    _checks.shape(op, "k", k, (*lead, None, q.shape[-1]), kv_dims)
    _checks.shape(op, "v", v, tuple(k.shape), kv_dims)
    _checks.dtype(op, "q", q, _FLOAT_DTYPES)
    _checks.same_dtype(op, q=q, k=k, v=v)
    _checks.same_device(op, q=q, k=k, v=v)
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(
            f"{op}: the query heads ({q.shape[-2]}) must be a multiple of the KV heads ({k.shape[-2]})"
        )


def _softmax_attention(q, k, v, mask, scale) -> torch.Tensor:
    """q: [B, Lq, H, d], k/v: [B, S, Hkv, d], mask: [B, Lq, S] bool (True = attend) -> [B, Lq, H, d] fp32.

    GQA by a [B, Hkv, G, ...] view of the queries, so K/V are broadcast, never copied per query head.
    """
    batch, q_len, heads, dim = q.shape
    kv_heads = k.shape[2]
    qf = q.float().view(batch, q_len, kv_heads, heads // kv_heads, dim).permute(0, 2, 3, 1, 4)
    kf = k.float().permute(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, S, d]
    vf = v.float().permute(0, 2, 1, 3)[:, :, None]
    scores = (qf @ kf.transpose(-1, -2)) * scale  # [B, Hkv, G, Lq, S]
    scores = scores.masked_fill(~mask[:, None, None], -math.inf)
    out = torch.softmax(scores, dim=-1) @ vf  # [B, Hkv, G, Lq, d]
    return out.permute(0, 3, 1, 2, 4).reshape(batch, q_len, heads, dim)


def _attention_reference(q, k, v, bounds, causal, scale, out) -> None:
    for start, end in itertools.pairwise(bounds):
        if end == start:
            continue
        n = end - start
        mask = torch.ones(1, n, n, dtype=torch.bool, device=q.device)
        if causal:
            mask = mask.tril()
        seq = slice(start, end)
        out[seq] = _softmax_attention(q[None, seq], k[None, seq], v[None, seq], mask, scale)[0]


_ATTENTION_IMPLS = {"torch": _dispatch.Impl(_attention_reference, can_run=_dispatch.always)}
