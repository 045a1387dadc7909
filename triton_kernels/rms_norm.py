"""RMSNorm over the last dim, optionally fused with the rotate-half RoPE (``kelix_fast.ops.rms_norm``)
or preceded by a residual add (``kelix_fast.ops.add_rms_norm``).

One program normalises ``BLOCK_ROWS`` rows held whole in registers (D <= 4096 at Kelix sizes: a row is
at most 16 KB of float32). With RoPE, a row is loaded as its two halves ``x[:D/2]`` and ``x[D/2:]``, which
are exactly the pairs the rotation mixes, so the rotation needs no shuffle; row r of the flattened
[N * H, D] input reads the cos/sin row ``r // H``.

Rows are addressed as [N, H, D] with two strides (``r // H`` and ``r % H``), so that heads sliced out
of a fused projection ([B, L, H * d] columns of a [B, L, (H + 2 Hkv) * d] output: the LLM's q and k)
are read in place instead of first copied to a contiguous tensor.

With ``RESIDUAL`` the row normalised is ``s = x + residual`` rounded to the input dtype (what a separate
add produces), and ``s`` is stored too: the residual stream's add and the next norm in one pass over the
row instead of two launches (a decode step of the LLM runs 72 of these pairs).

Every rounding of the reference happens here too (normalised value to the input dtype, times the weight
in that dtype, rotated value to the input dtype); ``round_to``/``cast_rne`` keep that exact under the
interpreter, whose bfloat16 casts truncate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rounding import cast_rne, interpreted, round_to

# Rows per program: one row per program keeps many programs in flight at decode sizes (a few rows).
_BLOCK_ROWS = 1
_BLOCK_ROWS_INTERPRETER = 64  # the interpreter pays per program, not per element


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [n_rows // heads, heads, dim], strides (stride_x_row, stride_x_head, 1)
    w_ptr,  # [dim]
    out_ptr,  # [n_rows, dim] contiguous, x's dtype
    residual_ptr,  # [n_rows, dim] contiguous, x's dtype (RESIDUAL only)
    sum_ptr,  # [n_rows, dim] contiguous, x's dtype: x + residual, output (RESIDUAL only)
    cos_ptr,  # [n_rows // heads, dim // 2] float32 contiguous (ROPE only)
    sin_ptr,
    n_rows,
    dim,
    eps,
    stride_x_row,
    stride_x_head,
    heads,  # rows per [heads, dim] group: one position's heads, sharing one cos/sin row with ROPE
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,  # >= dim, or >= dim / 2 with ROPE
    ROPE: tl.constexpr,
    RESIDUAL: tl.constexpr,  # not with ROPE
    BF16_BY_BITS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    dtype = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_D)
    x_rows = x_ptr + ((rows // heads) * stride_x_row + (rows % heads) * stride_x_head)[:, None]
    out_rows = out_ptr + rows[:, None] * dim
    if ROPE:
        half = dim // 2
        mask = row_mask[:, None] & (cols < half)[None, :]
        x1 = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_rows + half + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # 1 / sqrt_rn: the correctly rounded pair the reference's rsqrt gives on CPU.
        rstd = 1.0 / tl.sqrt_rn((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / dim + eps)
        w1 = tl.load(w_ptr + cols, mask=cols < half, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + half + cols, mask=cols < half, other=0.0).to(tl.float32)
        n1 = round_to(
            round_to(x1 * rstd[:, None], dtype, BF16_BY_BITS) * w1[None, :], dtype, BF16_BY_BITS
        )
        n2 = round_to(
            round_to(x2 * rstd[:, None], dtype, BF16_BY_BITS) * w2[None, :], dtype, BF16_BY_BITS
        )
        angle_rows = (rows // heads)[:, None] * half + cols[None, :]
        cos = tl.load(cos_ptr + angle_rows, mask=mask, other=0.0)
        sin = tl.load(sin_ptr + angle_rows, mask=mask, other=0.0)
        tl.store(
            out_rows + cols[None, :], cast_rne(n1 * cos - n2 * sin, dtype, BF16_BY_BITS), mask=mask
        )
        tl.store(
            out_rows + half + cols[None, :],
            cast_rne(n2 * cos + n1 * sin, dtype, BF16_BY_BITS),
            mask=mask,
        )
    else:
        mask = row_mask[:, None] & (cols < dim)[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL:
            dense = rows[:, None] * dim + cols[None, :]
            residual = tl.load(residual_ptr + dense, mask=mask, other=0.0).to(tl.float32)
            x = round_to(x + residual, dtype, BF16_BY_BITS)
            tl.store(sum_ptr + dense, cast_rne(x, dtype, BF16_BY_BITS), mask=mask)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=1) / dim + eps)
        w = tl.load(w_ptr + cols, mask=cols < dim, other=0.0).to(tl.float32)
        normed = round_to(x * rstd[:, None], dtype, BF16_BY_BITS) * w[None, :]
        tl.store(out_rows + cols[None, :], cast_rne(normed, dtype, BF16_BY_BITS), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    out: torch.Tensor,
    residual: torch.Tensor | None = None,
    summed: torch.Tensor | None = None,
) -> None:
    """Fill ``out`` (contiguous, x's shape) with ``kelix_fast.ops.rms_norm(x, ...)``, or with
    ``ops.add_rms_norm``'s ``out`` and ``summed`` (contiguous) when ``residual`` (contiguous) is given;
    inputs validated there."""
    dim = x.shape[-1]
    heads = x.shape[-2] if x.dim() > 1 else 1
    # [N, H, D]: a view for contiguous activations and for heads sliced out of a fused projection.
    groups = x.reshape(-1, heads, dim)
    if groups.numel() == 0:
        return
    if groups.stride(-1) != 1:
        groups = groups.contiguous()
    rope = cos is not None
    cos_arg = cos.contiguous() if rope else groups  # placeholder pointer when there is no RoPE
    sin_arg = sin.contiguous() if rope else groups
    add = residual is not None
    n_rows = groups.shape[0] * heads
    block_rows = _BLOCK_ROWS_INTERPRETER if interpreted(_rms_norm_kernel) else _BLOCK_ROWS
    block_d = triton.next_power_of_2(dim // 2 if rope else dim)
    _rms_norm_kernel[(triton.cdiv(n_rows, block_rows),)](
        groups,
        weight,
        out,
        residual if add else groups,  # placeholder pointers without a residual
        summed if add else groups,
        cos_arg,
        sin_arg,
        n_rows,
        dim,
        eps,
        groups.stride(0),
        groups.stride(1),
        heads,
        BLOCK_ROWS=block_rows,
        BLOCK_D=block_d,
        ROPE=rope,
        RESIDUAL=add,
        BF16_BY_BITS=interpreted(_rms_norm_kernel),
        num_warps=4 if block_d <= 1024 else 8,
    )
