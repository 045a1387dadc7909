"""``cached_attention``: the queries of each request against its KV cache (prefill, decode, Block Decoder).

GQA without expanding K/V: query head ``h`` reads KV head ``h // (H / Hkv)``; scores and softmax are
float32. Backends: ``triton`` (``kelix_fast.triton_kernels.decode_attention``: split-K flash-decoding,
each program reads a K/V tile once for all G query heads of its KV head; chosen by ``"auto"`` for CUDA
tensors) and ``torch`` (the reference below). Neither reads ``q_start`` or ``kv_lens`` on the host inside
:func:`kelix_fast.ops.trusted_values` or under CUDA graph capture.
"""

from __future__ import annotations

import torch

from kelix_fast import triton_kernels
from kelix_fast.ops import _checks, _dispatch
from kelix_fast.ops.flash_attention import _check_qkv, _softmax_attention

_TRITON_MAX_HEAD_DIM = 256  # triton_kernels.decode_attention.MAX_HEAD_DIM (triton may be absent)


def cached_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    q_start: torch.Tensor,
    kv_lens: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Queries of each request against its cached keys (prefill, decode, Block Decoder steps).

    Query row ``i`` of request ``b`` sits at position ``q_start[b] + i`` and sees cached keys ``j`` with
    ``j < kv_lens[b]`` and, if ``causal``, ``j <= q_start[b] + i``. Rows past a request's own length are
    computed and must be ignored by the caller (right-padded batches).

    Args:
        q: [B, Lq, H, d]; k_cache, v_cache: [B, S, Hkv, d], same dtype and device; H % Hkv == 0.
        q_start: [B] int64 >= 0, position of query row 0. kv_lens: [B] int64 in [1, S].
        causal: mask keys after each query row's position (a bool).
        scale: softmax scale, a finite number; default ``d ** -0.5``.
        backend: ``"auto" | "triton" | "torch"``. See :func:`kelix_fast.ops.resolve_backend`; ``"auto"``
            picks triton for CUDA tensors it supports (contiguous last dims, d <= 256), else torch.
            triton on CPU tensors runs only when asked for by name under Triton's interpreter.

    Returns:
        [B, Lq, H, d] in the dtype of ``q``.
    """
    op = "cached_attention"
    _check_qkv(op, q, k_cache, v_cache, packed=False)
    batch = q.shape[0]
    for name, t in (("q_start", q_start), ("kv_lens", kv_lens)):
        _checks.tensor(op, name, t)
        _checks.shape(op, name, t, (batch,), "B")
        _checks.dtype(op, name, t, (torch.int64,))
        _checks.same_device(op, q=q, **{name: t})
    _checks.ids_in_range(op, "kv_lens", kv_lens, 1, k_cache.shape[1] + 1)
    if _checks.values_checked() and q_start.numel() and bool((q_start < 0).any()):
        raise ValueError(f"{op}: q_start must be >= 0, got {int(q_start.min())}")
    _checks.flag(op, "causal", causal)
    scale = q.shape[-1] ** -0.5 if scale is None else _checks.number(op, "scale", scale)
    out = torch.empty_like(q)
    impl = _dispatch.pick(op, _IMPLS, backend, q, k_cache, v_cache)
    impl.run(q, k_cache, v_cache, q_start, kv_lens, causal, scale, out)
    return out


def _cached_attention_reference(q, k_cache, v_cache, q_start, kv_lens, causal, scale, out) -> None:
    if q.shape[0] == 0:
        return
    # Keys past the longest request are never read; finding it syncs, so trusted callers read them all.
    span = int(kv_lens.max()) if _checks.values_checked() else k_cache.shape[1]
    key_pos = torch.arange(span, device=q.device)
    mask = (key_pos[None, None, :] < kv_lens[:, None, None]).expand(-1, q.shape[1], -1)
    if causal:
        q_pos = q_start[:, None] + torch.arange(q.shape[1], device=q.device)
        mask = mask & (key_pos[None, None, :] <= q_pos[:, :, None])
    out.copy_(_softmax_attention(q, k_cache[:, :span], v_cache[:, :span], mask, scale))


def _triton(q, k_cache, v_cache, q_start, kv_lens, causal, scale, out) -> None:
    kernels = triton_kernels.kernels_for("decode_attention", q)
    kernels.decode_attention(q, k_cache, v_cache, q_start, kv_lens, out, causal=causal, scale=scale)


def _triton_can_run(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> str | None:
    """needs_triton, a head dim that fits its registers, and a contiguous last dim (any other stride)."""
    reason = _dispatch.needs_triton(q, k_cache, v_cache) or _dispatch.head_dim_over(
        q, _TRITON_MAX_HEAD_DIM
    )
    if reason is not None:
        return reason
    strided = [name for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache))
               if t.shape[-1] > 1 and t.stride(-1) != 1]  # fmt: skip
    if strided:
        return f"it needs a contiguous last dim, got strided {', '.join(strided)}"
    return None


_IMPLS = {
    "triton": _dispatch.Impl(_triton, can_run=_triton_can_run, auto_can_run=_dispatch.on_cuda),
    "torch": _dispatch.Impl(_cached_attention_reference, can_run=_dispatch.always),
}
