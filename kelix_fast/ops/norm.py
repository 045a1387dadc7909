"""``rms_norm``: RMSNorm, optionally followed by the rotate-half RoPE (the Qwen3 QK-norm + RoPE) in one
pass; ``add_rms_norm``: the residual stream's add and the next RMSNorm in one pass.

At decode time every LLM layer normalises a handful of rows (the residual stream twice, q and k once
each, then rotates q and k): unfused, that is about 25 tiny kernels per layer, 900 per step, whose fixed
cost rivals the weight streaming even under a CUDA graph. The fused kernel reads each row once and writes
it once.

Backends: ``triton`` (``kelix_fast.triton_kernels.rms_norm``) and the PyTorch reference ``torch``; ``"auto"``
picks triton for CUDA tensors.
"""

from __future__ import annotations

import torch

from kelix_fast import triton_kernels
from kelix_fast.ops import _checks, _dispatch

_OP = "rms_norm"
_ADD_OP = "add_rms_norm"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    eps: float,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``(x * rsqrt(mean(x^2) + eps)).to(x.dtype) * weight`` over the last dim, then optionally RoPE.

    The mean and the normalisation are float32, the result is rounded to x's dtype, and the weight is
    applied in that dtype (one more rounding), as the official RMSNorm. With ``rope_cos``/``rope_sin``
    the normalised rows are then rotated by :func:`rotate_half_rope` (float32, rounded once).

    Args:
        x: [..., D] float32/bfloat16/float16; with RoPE [..., H, D] (H heads sharing a position).
        weight: [D], dtype of ``x``.
        eps: added to the mean square, finite, > 0.
        rope_cos, rope_sin: None, or both [..., D/2] float32 with x's leading dims (without H).
        backend: ``"auto" | "triton" | "torch"``.

    Returns:
        [..., D] in x's dtype (a new contiguous tensor).
    """
    _check_norm(_OP, x, weight)
    dim = x.shape[-1]
    # > 0: an all-zero row would divide 0 by 0 (NaN) with eps = 0.
    eps = _checks.number(_OP, "eps", eps, minimum=0, strict=True)
    if (rope_cos is None) != (rope_sin is None):
        raise ValueError(f"{_OP}: rope_cos and rope_sin must be given together")
    if rope_cos is not None:
        if x.dim() < 2 or dim % 2:
            raise ValueError(
                f"{_OP}: RoPE needs x of shape [..., H, D] with an even D, got {list(x.shape)}"
            )
        want = (*x.shape[:-2], dim // 2)
        for name, t in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
            _checks.shape(_OP, name, t, want, "x's leading dims without H, D/2")
            _checks.dtype(_OP, name, t, (torch.float32,))
            _checks.same_device(_OP, x=x, **{name: t})
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    impl = _dispatch.pick(_OP, _IMPLS, backend, x, weight)
    impl.run(x, weight, eps, rope_cos, rope_sin, out)
    return out


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    *,
    eps: float,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (in x's dtype), then ``rms_norm(s)``: returns ``(rms_norm(s), s)``.

    A transformer layer's ``h = h + sublayer(norm(h))`` followed by the next ``norm(h)``: the add and
    the norm read the row once and cost one launch instead of two. ``s`` is rounded to x's dtype
    exactly as a separate ``x + residual`` is, so results equal the unfused pair bit for bit on the
    reference.

    Args:
        x: [..., D] float32/bfloat16/float16 (a sublayer's output).
        residual: x's shape and dtype (the residual stream).
        weight: [D], dtype of ``x``.
        eps: added to the mean square, finite, > 0.
        backend: ``"auto" | "triton" | "torch"`` (the backends of :func:`rms_norm`).

    Returns:
        ``(out, s)``: both [..., D] in x's dtype, new contiguous tensors.
    """
    _checks.tensor(_ADD_OP, "residual", residual)
    _check_norm(_ADD_OP, x, weight)
    _checks.shape(_ADD_OP, "residual", residual, tuple(x.shape), "x's shape")
    _checks.same_dtype(_ADD_OP, x=x, residual=residual)
    _checks.same_device(_ADD_OP, x=x, residual=residual)
    eps = _checks.number(_ADD_OP, "eps", eps, minimum=0, strict=True)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(out)
    impl = _dispatch.pick(_ADD_OP, _IMPLS, backend, x, weight)
    impl.run(x, weight, eps, None, None, out, residual, summed)
    return out, summed


def _check_norm(op: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    """x: [..., D] of a float dtype, weight: [D] of x's dtype and device."""
    _checks.tensor(op, "x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have shape [..., D] with D >= 1, got {list(x.shape)}")
    _checks.dtype(op, "x", x, _FLOAT_DTYPES)
    _checks.shape(op, "weight", weight, (x.shape[-1],), "D")
    _checks.same_dtype(op, x=x, weight=weight)
    _checks.same_device(op, x=x, weight=weight)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference RMSNorm: ``(x * rsqrt(mean(x^2) + eps)).to(x.dtype) * weight``."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(j, j + d/2)`` by angle ``a_j`` in float32, then cast back to ``x.dtype``.

    x: [..., d]; cos, sin: [..., d/2] float32, broadcastable to x's leading dims. The non-interleaved
    layout of the Qwen3 RoPE, the ViT's 2-D RoPE and the DiT's cross-attention RoPE.
    """
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def _reference(x, weight, eps, cos, sin, out, residual=None, summed=None) -> None:
    if residual is not None:
        x = summed.copy_(x + residual)
    normed = rms_norm_reference(x, weight, eps)
    if cos is not None:
        normed = rotate_half_rope(normed, cos[..., None, :], sin[..., None, :])
    out.copy_(normed)


def _triton(x, weight, eps, cos, sin, out, residual=None, summed=None) -> None:
    kernels = triton_kernels.kernels_for("rms_norm", x)
    if residual is not None:
        # The kernel reads the residual as dense rows (the engine's activations are contiguous); x
        # may be strided, as for rms_norm.
        residual = residual.contiguous()
    kernels.rms_norm(x, weight, eps, cos, sin, out, residual, summed)


_IMPLS = {
    "triton": _dispatch.Impl(
        _triton, can_run=_dispatch.needs_triton, auto_can_run=_dispatch.on_cuda
    ),
    "torch": _dispatch.Impl(_reference, can_run=_dispatch.always),
}
