"""``cached_attention``: the queries of each request against its KV cache (prefill, decode, Block Decoder).

Only the PyTorch reference exists so far (the decode kernel comes with the attention issue). GQA without
expanding K/V: query head ``h`` reads KV head ``h // (H / Hkv)``; scores and softmax are float32.
"""

from __future__ import annotations

import torch

from kelix_fast.ops import _checks, _dispatch
from kelix_fast.ops.attention import _check_qkv, _softmax_attention


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
        q_start: [B] int64, position of query row 0. kv_lens: [B] int64 in [1, S].

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
    if kv_lens.numel():
        _checks.ids_in_range(op, "kv_lens", kv_lens, 1, k_cache.shape[1] + 1)
    out = torch.empty_like(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
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


_IMPLS = {"torch": _dispatch.Impl(_cached_attention_reference, can_run=_dispatch.always)}
