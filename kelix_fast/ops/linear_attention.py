"""``linear_attention``: SANA ReLU linear attention ("LiteLA"), the Kelix-DiT self-attention (kelix-dit.md §3.5.1).

Backends: ``triton`` (``kelix_fast.triton_kernels.linear_attention``: a split token reduction to float32
partial states, then one pass over the queries, §9.5) and the PyTorch reference ``torch``; ``"auto"``
prefers triton for CUDA tensors.
"""

from __future__ import annotations

import torch

from kelix_fast.ops import _checks, _dispatch

_OP = "linear_attention"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON_MAX_HEAD_DIM = 128  # the kernels hold a [d, d] float32 state per program


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
        eps: added to the denominator (1e-8 in the DiT, 1e-15 in the DC-AE).
        backend: ``"auto" | "triton" | "torch"``. ``"auto"`` picks triton for CUDA tensors with
            d <= 128, else torch; triton on CPU tensors runs only when asked for by name under
            Triton's interpreter. See :func:`kelix_fast.ops.resolve_backend`.

    Returns:
        [B, N, H, d] in the dtype of ``q`` (computed in float32, rounded once).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(_OP, name, t)
    _checks.shape(_OP, "q", q, (None, None, None, None), "B, N, H, d")
    _checks.shape(_OP, "k", k, tuple(q.shape), "B, N, H, d like q")
    _checks.shape(_OP, "v", v, tuple(q.shape), "B, N, H, d like q")
    _checks.dtype(_OP, "q", q, _FLOAT_DTYPES)
    _checks.same_dtype(_OP, q=q, k=k, v=v)
    _checks.same_device(_OP, q=q, k=k, v=v)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{_OP}: eps must be a positive number, got {eps!r}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _dispatch.pick(_OP, _IMPLS, backend, q, k, v).run(q, k, v, float(eps), out)
    return out


def _reference(q, k, v, eps, out) -> None:
    # ReLU commutes with the float32 upcast, so taking it first changes nothing (the official order).
    qf, kf, vf = q.relu().float(), k.relu().float(), v.float()
    state = torch.einsum("bnhe,bnhd->bhed", vf, kf)  # S per head: [B, H, d_v, d_k]
    k_sum = kf.sum(dim=1)  # z: [B, H, d]
    numerator = torch.einsum("bhed,bnhd->bnhe", state, qf)
    denominator = torch.einsum("bhd,bnhd->bnh", k_sum, qf)[..., None]
    out.copy_(numerator / (denominator + eps))


def _triton(q, k, v, eps, out) -> None:
    from kelix_fast.triton_kernels import linear_attention as kernels

    kernels.linear_attention(q, k, v, eps, out)


def _can_run_triton(q: torch.Tensor, *tensors: torch.Tensor) -> str | None:
    return _dispatch.head_dim_over(q, _TRITON_MAX_HEAD_DIM) or _dispatch.needs_triton(q, *tensors)


_IMPLS = {
    "triton": _dispatch.Impl(_triton, can_run=_can_run_triton, auto_can_run=_dispatch.on_cuda),
    "torch": _dispatch.Impl(_reference, can_run=_dispatch.always),
}
