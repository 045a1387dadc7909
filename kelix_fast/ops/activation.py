"""``silu_mul``: SwiGLU's activation, ``silu(gate) * up``, on the fused gate/up projection.

The LLM's and the Block Decoder's MLPs compute gate and up in one GEMM, ``gu = x @ [W1; W3]^T`` of
shape [..., 2I] (I: the MLP's intermediate width, 12,288 in Qwen3-8B); the activation then takes
``F.silu(gu[..., :I]) * gu[..., I:]``, two elementwise launches per layer in PyTorch (44 per decode
block step at Qwen3-8B size: 36 LLM layers and 8 Block Decoder steps). The fused kernel reads the
projection's output in place and writes [..., I] once (vLLM's ``SiluAndMul``).

Backends: ``triton`` (``kelix_fast.triton_kernels.silu_mul``) and the PyTorch reference ``torch``;
``"auto"`` picks triton for CUDA tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kelix_fast import triton_kernels
from kelix_fast.ops import _checks, _dispatch

_OP = "silu_mul"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def silu_mul(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu(x[..., :I]) * x[..., I:]`` with ``silu(g) = g / (1 + exp(-g))``.

    Exactly the reference ``F.silu(x[..., :I]) * x[..., I:]``: silu in float32 rounded to x's dtype,
    then the product rounded to x's dtype. The triton backend rounds at the same two places, so it
    differs from the reference only where its float32 ``exp`` differs in the last bit from torch's
    (Sleef/libm on CPU, ``expf`` on CUDA; numpy's under the interpreter, ``ex2.approx`` on the GPU):
    a few float32 ulps, and in bf16/fp16 an output that differs at all differs by one or two ulps
    of its dtype (rare: tests/ops/test_silu_mul.py bounds the fraction).

    Args:
        x: [..., 2I] float32/bfloat16/float16, 2I even and > 0; the last dim contiguous (stride 1),
            the row stride free (a column slice of a wider tensor is read in place; leading dims
            whose strides do not merge into one row stride are copied into rows first). Gate
            columns ``[0, I)``, then up columns ``[I, 2I)``: the layout of ``x @ [W1; W3]^T``.
        backend: ``"auto" | "triton" | "torch"``.

    Returns:
        [..., I] in x's dtype (a new contiguous tensor).

    Raises:
        TypeError: x is not a tensor.
        ValueError: odd or zero last dim, unsupported dtype, last dim not contiguous.
        BackendUnavailableError: the backend cannot run here.
    """
    _checks.tensor(_OP, "x", x)
    if x.dim() < 1 or x.shape[-1] == 0 or x.shape[-1] % 2:
        raise ValueError(
            f"{_OP}: x must have shape [..., 2I] with an even 2I > 0, got {list(x.shape)}"
        )
    _checks.dtype(_OP, "x", x, _FLOAT_DTYPES)
    if x.stride(-1) != 1:
        raise ValueError(
            f"{_OP}: x must have a contiguous last dim (stride 1), got strides {list(x.stride())}"
        )
    out = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)
    impl = _dispatch.pick(_OP, _IMPLS, backend, x)
    impl.run(x, out)
    return out


def _reference(x: torch.Tensor, out: torch.Tensor) -> None:
    gate, up = x.chunk(2, dim=-1)
    out.copy_(F.silu(gate) * up)


def _triton(x: torch.Tensor, out: torch.Tensor) -> None:
    triton_kernels.kernels_for("silu_mul", x).silu_mul(x, out)


_IMPLS = {
    "triton": _dispatch.Impl(
        _triton, can_run=_dispatch.needs_triton, auto_can_run=_dispatch.on_cuda
    ),
    "torch": _dispatch.Impl(_reference, can_run=_dispatch.always),
}
