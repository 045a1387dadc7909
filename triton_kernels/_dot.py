"""Tile products that are also correct under Triton's interpreter (shared by every kernel's tl.dot).

On a GPU both helpers are one ``tl.dot`` with a float32 accumulator: bf16/fp16 tiles on the tensor cores,
float32 tiles in IEEE float32 (``input_precision="ieee"``: no TF32). Under the interpreter the kernels pass
``UPCAST_DOT``, because the interpreter's bf16 ``tl.dot`` gives garbage (TOOLCHAIN.md trap 2); a constexpr,
so the GPU path keeps its low-precision operands. Products of bf16/fp16 values are exact in float32, so
the upcast changes no product.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot(a, b, UPCAST_DOT: tl.constexpr):
    """``a [M, K] @ b [K, N]`` -> float32 [M, N]; under ``UPCAST_DOT``, ``tl.dot`` of float32 copies."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def tie_exact_dot(a, b, UPCAST_DOT: tl.constexpr):
    """:func:`dot` for the kernels that pick an argmin/argmax by exact ties: equal columns of ``b`` give
    bit-equal columns of the product, on a GPU (one reduction order per element) and in the interpreter.

    Under ``UPCAST_DOT`` it multiplies float32 copies and sums over K instead of calling ``tl.dot``: the
    interpreter's float32 dot is a BLAS GEMM that rounds tail columns differently, which would split exact
    ties between identical codes or head rows.
    """
    if UPCAST_DOT:
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    else:
        return tl.dot(a, b, input_precision="ieee")
