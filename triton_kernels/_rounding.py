"""Float rounding that is also correct under Triton's interpreter (shared by the kernels that round).

The interpreter's float32 -> bfloat16 cast truncates, and its ``"rtne"`` mode does not carry into the
exponent (triton 3.6, ``_convert_float``), so a kernel whose results are compared bit for bit rounds on
the bits there. On a GPU the plain cast rounds to nearest even in one instruction.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def cast_rne(x, dtype: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    """float32 ``x`` cast to ``dtype``, rounding to nearest, ties to even."""
    if BF16_BY_BITS and dtype == tl.bfloat16:
        # Add 0x7FFF plus the lowest kept bit, then keep the high half: the standard RNE on the bits.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def round_to(x, dtype: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    """float32 ``x`` rounded to ``dtype`` and widened back to float32 (a no-op for float32)."""
    if dtype == tl.float32:
        return x
    else:
        return cast_rne(x, dtype, BF16_BY_BITS).to(tl.float32)


def interpreted(kernel: object) -> bool:
    """Whether ``kernel`` was decorated for the interpreter (TRITON_INTERPRET=1 at import)."""
    return isinstance(kernel, InterpretedFunction)
