"""SwiGLU's activation on a fused gate/up projection (``kelix_fast.ops.silu_mul``):
``out = silu(x[:, :I]) * x[:, I:]``.

The MLPs compute gate and up in one GEMM, ``[n, 2I]``; this kernel reads both halves of that output in
place (rows may be strided) and writes ``[n, I]`` once: one launch instead of PyTorch's two (``silu``,
then the product), and one pass over the data instead of two.

The grid is rows x column blocks, not one program per whole row: at decode a step has a handful of rows
of I = 12288 (Qwen3-8B), and one program per row would stream each 48 KB row through a single SM.
``_BLOCK_COLS`` columns per program give every thread 16-byte loads of a 16-bit dtype (8 elements x
128 threads) and 12 programs per row at I = 12288.

Numerics follow the reference ``F.silu(g) * u`` step by step: ``g / (1 + exp(-g))`` in float32 (with a
correctly rounded division, as torch's), rounded to the input dtype, then the product computed in
float32 and rounded again (``round_to``/``cast_rne``, exact under the interpreter, whose bfloat16 casts
truncate). The only difference left is ``exp``'s last float32 bit (numpy's under the interpreter,
``ex2.approx`` on the GPU, Sleef or libm in torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rounding import cast_rne, interpreted, round_to

# (rows, columns) per program. GPU: one row, 1024 columns with 4 warps (8 columns per thread).
_BLOCK_ROWS = 1
_BLOCK_COLS = 1024
_NUM_WARPS = 4
# The interpreter pays per program, not per element: many rows and wide column blocks.
_BLOCK_ROWS_INTERPRETER = 16
_BLOCK_COLS_INTERPRETER = 4096


@triton.jit
def _silu_mul_kernel(
    x_ptr,  # [n_rows, 2 * n_cols], strides (stride_x_row, 1): gate columns, then up columns
    out_ptr,  # [n_rows, n_cols] contiguous, x's dtype
    n_rows,
    n_cols,  # I
    stride_x_row,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    dtype = out_ptr.dtype.element_ty
    gate_ptrs = x_ptr + rows[:, None] * stride_x_row + cols[None, :]
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + n_cols, mask=mask, other=0.0).to(tl.float32)
    # torch's silu: x / (1 + exp(-x)) in float32, rounded to the dtype; exp(-x) = inf for x < -88
    # gives -0.0 as in torch, and NaN propagates.
    silu = round_to(tl.div_rn(gate, 1.0 + tl.exp(-gate)), dtype, BF16_BY_BITS)
    # The product of two values of a 16-bit dtype is exact in float32: one rounding, as torch's.
    tl.store(
        out_ptr + rows[:, None] * n_cols + cols[None, :],
        cast_rne(silu * up, dtype, BF16_BY_BITS),
        mask=mask,
    )


def silu_mul(x: torch.Tensor, out: torch.Tensor) -> None:
    """Fill ``out`` ([..., I] contiguous, x's dtype) with ``kelix_fast.ops.silu_mul(x)``; x [..., 2I]
    with a unit last stride, validated there. Leading dims that do not merge into one row stride are
    copied into rows first (the engine's projections are contiguous)."""
    n_cols = out.shape[-1]
    rows = x.reshape(-1, 2 * n_cols)  # a view unless the leading dims have unmergeable strides
    n_rows = rows.shape[0]
    if n_rows == 0 or n_cols == 0:
        return
    if interpreted(_silu_mul_kernel):
        block_rows = _BLOCK_ROWS_INTERPRETER
        block_cols = min(_BLOCK_COLS_INTERPRETER, triton.next_power_of_2(n_cols))
    else:
        block_rows, block_cols = _BLOCK_ROWS, _BLOCK_COLS
    grid = (triton.cdiv(n_rows, block_rows), triton.cdiv(n_cols, block_cols))
    _silu_mul_kernel[grid](
        rows,
        out,
        n_rows,
        n_cols,
        rows.stride(0),
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        BF16_BY_BITS=interpreted(_silu_mul_kernel),
        num_warps=_NUM_WARPS,
    )
