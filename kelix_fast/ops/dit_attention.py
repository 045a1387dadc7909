"""The Kelix-DiT attention ops (kelix-dit.md §3.5).

``linear_attention``: SANA ReLU linear attention ("LiteLA"), the DiT self-attention (§3.5.1). Backends:
``triton`` (``kelix_fast.triton_kernels.linear_attention``: a split token reduction to float32 partial
states, then one pass over the queries, §9.5) and the PyTorch reference ``torch``.

``cross_attention``: softmax attention of the latent tokens to the padded condition (§3.5.2). Backends:
``triton`` (``kelix_fast.triton_kernels.cross_attention``: flash-style online softmax that skips the key
tiles after a sample's last valid key, §9.5) and the PyTorch reference ``torch``.

``"auto"`` prefers triton for CUDA tensors; ``backend="torch"`` is the reference, the ops' spec.
"""

from __future__ import annotations

import torch

from kelix_fast import triton_kernels
from kelix_fast.ops import _checks, _dispatch

_LINEAR_OP = "linear_attention"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LINEAR_TRITON_MAX_HEAD_DIM = 128  # the kernels hold a [d, d] float32 state per program


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    eps: float = 1e-8,
    backend: str = "auto",
) -> torch.Tensor:
    """Non-causal ReLU linear attention per (batch, head), in float32:

    ``S = sum_j v_j relu(k_j)^T`` [d, d], ``z = sum_j relu(k_j)`` [d],
    ``out_i = S relu(q_i) / (z . relu(q_i) + eps)``.

    The official code gets the denominator by padding ``v`` with a row of ones (a [d+1, d] state) and
    dividing by the last output row; that is this formula. No mask and no positions: every query sees all
    N tokens of its sample.

    Args:
        q, k, v: [B, N, H, d], same float dtype (float32/bfloat16/float16) and device. The layout of a
            ``[B, N, H*d]`` projection viewed per head (channel ``c`` is head ``c // d``); any strides.
        eps: added to the denominator, finite, > 0 (1e-8 in the DiT, 1e-15 in the DC-AE).
        backend: ``"auto" | "triton" | "torch"``. ``"auto"`` picks triton for CUDA tensors with
            d <= 128, else torch; triton on CPU tensors runs only when asked for by name under
            Triton's interpreter. See :func:`kelix_fast.ops.resolve_backend`.

    Returns:
        [B, N, H, d] in the dtype of ``q`` (computed in float32, rounded once).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(_LINEAR_OP, name, t)
    _checks.shape(_LINEAR_OP, "q", q, (None, None, None, None), "B, N, H, d")
    _checks.shape(_LINEAR_OP, "k", k, tuple(q.shape), "B, N, H, d like q")
    _checks.shape(_LINEAR_OP, "v", v, tuple(q.shape), "B, N, H, d like q")
    _checks.dtype(_LINEAR_OP, "q", q, _FLOAT_DTYPES)
    _checks.same_dtype(_LINEAR_OP, q=q, k=k, v=v)
    _checks.same_device(_LINEAR_OP, q=q, k=k, v=v)
    eps = _checks.number(_LINEAR_OP, "eps", eps, minimum=0, strict=True)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _dispatch.pick(_LINEAR_OP, _LINEAR_IMPLS, backend, q, k, v).run(q, k, v, eps, out)
    return out


def _linear_reference(q, k, v, eps, out) -> None:
    # ReLU commutes with the float32 upcast, so taking it first changes nothing (the official order).
    qf, kf, vf = q.relu().float(), k.relu().float(), v.float()
    state = torch.einsum("bnhe,bnhd->bhed", vf, kf)  # S per head: [B, H, d_v, d_k]
    k_sum = kf.sum(dim=1)  # z: [B, H, d]
    numerator = torch.einsum("bhed,bnhd->bnhe", state, qf)
    denominator = torch.einsum("bhd,bnhd->bnh", k_sum, qf)[..., None]
    out.copy_(numerator / (denominator + eps))


def _linear_triton(q, k, v, eps, out) -> None:
    kernels = triton_kernels.kernels_for("linear_attention", q)
    kernels.linear_attention(q, k, v, eps, out)


def _linear_can_run_triton(q: torch.Tensor, *tensors: torch.Tensor) -> str | None:
    return _dispatch.head_dim_over(q, _LINEAR_TRITON_MAX_HEAD_DIM) or _dispatch.needs_triton(
        q, *tensors
    )


_LINEAR_IMPLS = {
    "triton": _dispatch.Impl(
        _linear_triton, can_run=_linear_can_run_triton, auto_can_run=_dispatch.on_cuda
    ),
    "torch": _dispatch.Impl(_linear_reference, can_run=_dispatch.always),
}

_CROSS_OP = "cross_attention"
_CROSS_TRITON_MAX_HEAD_DIM = 128  # one [BLOCK_M, d] accumulator and query tile per program
_TRITON_MAX_BATCH_HEADS = 65535  # B*H is the second grid dimension

# The official additive key-padding bias, (1 - mask) * -10000: finite, so a row whose keys are all masked
# attends to every key as if none were masked instead of producing NaN, and it is rounded to the input
# dtype (-9984 in bf16).
MASK_BIAS = -10000.0


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``o = softmax(q k^T * scale + bias) v`` with ``bias = 0`` on valid keys, ``-10000`` on masked ones.

    Non-causal; every query of sample b sees the keys of sample b. Scores, bias and softmax are float32;
    the bias is first rounded to the input dtype, as the official ``(1 - mask) * -10000`` tensor is.

    Args:
        q: [B, Lq, H, d]; k, v: [B, Lk, H, d]; same float dtype (float32/bfloat16/float16) and device.
        key_mask: [B, Lk] bool, True = valid key (padding rows of the condition are False).
        scale: softmax scale, a finite number; default ``d ** -0.5``.
        backend: ``"auto" | "triton" | "torch"``. ``"auto"`` picks triton for CUDA tensors with
            d <= 128, else torch; triton on CPU tensors runs only when asked for by name under
            Triton's interpreter. See :func:`kelix_fast.ops.resolve_backend`. triton reads no key
            after a sample's last valid key when the sample has one: those keys' weights underflow
            to exactly 0 in float32, so the result is the reference's while every score lies within
            about 9,860 of the valid keys' scores and the skipped K/V rows are finite (see
            ``triton_kernels/cross_attention.py``).

    Returns:
        [B, Lq, H, d] in the dtype of ``q``.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("key_mask", key_mask)):
        _checks.tensor(_CROSS_OP, name, t)
    _checks.shape(_CROSS_OP, "q", q, (None, None, None, None), "B, Lq, H, d")
    _checks.shape(_CROSS_OP, "k", k, (q.shape[0], None, q.shape[2], q.shape[3]), "B, Lk, H, d")
    _checks.shape(_CROSS_OP, "v", v, tuple(k.shape), "B, Lk, H, d like k")
    _checks.shape(_CROSS_OP, "key_mask", key_mask, tuple(k.shape[:2]), "B, Lk")
    _checks.dtype(_CROSS_OP, "q", q, _FLOAT_DTYPES)
    _checks.same_dtype(_CROSS_OP, q=q, k=k, v=v)
    _checks.dtype(_CROSS_OP, "key_mask", key_mask, (torch.bool,))
    _checks.same_device(_CROSS_OP, q=q, k=k, v=v, key_mask=key_mask)
    if k.shape[1] == 0:
        raise ValueError(f"{_CROSS_OP}: k must hold at least one key, got shape {list(k.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else _checks.number(_CROSS_OP, "scale", scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _dispatch.pick(_CROSS_OP, _CROSS_IMPLS, backend, q, k, v, key_mask).run(
        q, k, v, key_mask, scale, out
    )
    return out


def _mask_bias(dtype: torch.dtype) -> float:
    """MASK_BIAS rounded to ``dtype``, as the official bias tensor holds it (-9984 in bf16)."""
    return torch.tensor(MASK_BIAS, dtype=dtype).item()


def _cross_reference(q, k, v, key_mask, scale, out) -> None:
    bias = _mask_bias(q.dtype)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    scores = scores + torch.where(key_mask, 0.0, bias)[:, None, None, :]
    out.copy_(torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v.float()))


def _cross_triton(q, k, v, key_mask, scale, out) -> None:
    kernels = triton_kernels.kernels_for("cross_attention", q)
    kernels.cross_attention(q, k, v, key_mask, scale, _mask_bias(q.dtype), out)


def _cross_can_run_triton(q: torch.Tensor, *tensors: torch.Tensor) -> str | None:
    batch, _, num_heads, _ = q.shape
    reason = _dispatch.head_dim_over(q, _CROSS_TRITON_MAX_HEAD_DIM)
    if reason is not None:
        return reason
    if batch * num_heads > _TRITON_MAX_BATCH_HEADS:
        return f"its grid takes B*H <= {_TRITON_MAX_BATCH_HEADS}, got {batch * num_heads}"
    return _dispatch.needs_triton(q, *tensors)


_CROSS_IMPLS = {
    "triton": _dispatch.Impl(
        _cross_triton, can_run=_cross_can_run_triton, auto_can_run=_dispatch.on_cuda
    ),
    "torch": _dispatch.Impl(_cross_reference, can_run=_dispatch.always),
}
