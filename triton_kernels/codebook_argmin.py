"""Fused per-group LayerNorm + nearest-code search of Kelix-Tok (kelix-ar.md §3.5).

One program takes BLOCK_N query rows of one group, normalizes them in registers, and streams that group's
codebook through ``tl.dot`` in BLOCK_K-code tiles, keeping a running (min, index) per row: the [n, K]
distance matrix never exists in memory.

``mode="exact"``: ``|c|^2 - 2 u.c`` in float32 with the precomputed float32 norms, the formula of the op's
reference. With bf16/fp16 codebooks the product runs on the tensor cores: the float32 u is split into
SPLIT parts of the codebook dtype, u = u_hi + u_mid (+ u_lo), and ``sum_p u_p . c`` is accumulated in
one float32 accumulator, where every product of two 16-bit values is exact. Three bf16 parts (8
significant bits each) hold a float32 exactly; two fp16 parts (11 bits each) leave a 2^-22 relative
remainder (and need |u| < 65504, which a LayerNorm output with moderate weights satisfies). So the
distances carry float32 accumulation error only, as the reference's do. Float32 codebooks use an IEEE
float32 ``tl.dot`` (FMA units, no TF32). ``mode="reference"``: the official bf16 ``cdist`` arithmetic, each
rounding step emulated with a cast to the input dtype (LayerNorm output, squares and norms, the augmented
GEMM output, clamp, sqrt, square). Bit parity with a GEMM library is not guaranteed for near-ties in
bf16/fp16: the float32 accumulation order of the GEMM differs, and a one-ulp difference before the bf16
rounding can flip a near-tie. Float32 inputs, and bf16 inputs whose nearest code wins by a margin, agree.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dot import tie_exact_dot
from ._rounding import cast_rne, interpreted, round_to

# (BLOCK_N rows, BLOCK_K codes, num_warps, NUM_STAGES, SPLIT parts of u), keyed by (exact mode, the
# codebook dtype, which the tile GEMM reads). BLOCK_D is the group dim rounded up to a power of two, at
# least 16 (the minimum K-dim of tl.dot). NUM_STAGES pipelines the code-tile loop (the |c|^2 loads
# included); None keeps the launch default (3 stages of the code tiles). Sized on the sm_90a build at
# d = 128 (tests/build/test_triton_compile.py):
# - exact 16-bit: two warpgroups of 64 rows share each [128 x 128] code tile (wgmma), halving the L2
#   traffic of 64-row programs (which would need ~4.8 TB/s of L2 reads at the tensor-core rate of 3
#   bf16 parts, near what an H100/H200 L2 delivers); the u parts (96 KiB in bf16) and two code-tile
#   stages (64 KiB) fit in shared memory; no stack.
# - reference 16-bit: one GEMM part, so per byte of code tile a third of exact mode's tensor work: the
#   code tiles' L2 traffic binds first. 128-row programs stream each group's codebook (2 MiB) half as
#   often as 64-row ones: 0.5 GB instead of 1 GB of L2 reads at n = 4,096, ~2.5 TB/s at the 0.2 ms goal
#   instead of ~5. Two stages keep it at 161 registers and 98.5 KiB (two programs per SM), no stack
#   (64 x 128 on 4 warps: 152 registers, 115 KiB).
# - float32 (both modes): the IEEE FMA dot holds both operand slices for the whole d in registers, so it
#   needs few accumulators per thread: 32 x 64 on 8 warps with 3 stages on the loop takes 64 registers
#   (on 4 warps, or with the launch's default pipelining, it spilled 632-656 bytes of stack per thread).
_BLOCKS = {
    (False, torch.float32): (32, 64, 8, 3, 1),
    (False, torch.bfloat16): (128, 128, 8, 2, 1),
    (False, torch.float16): (128, 128, 8, 2, 1),
    (True, torch.float32): (32, 64, 8, 3, 1),
    (True, torch.bfloat16): (128, 128, 8, 2, 3),
    (True, torch.float16): (128, 128, 8, 2, 2),
}
_MIN_DOT_DIM = 16
# Exact 16-bit tiles for groups wider than 128 (BLOCK_D 256): the u parts and code tiles double, and the
# tiles above would need 320 KiB of shared memory; one warpgroup on 64 x 64 tiles takes 160 KiB.
_WIDE_EXACT_BLOCKS = (64, 64, 4)
# Under the interpreter the tile product is a [BLOCK_N, BLOCK_D, BLOCK_K] broadcast (_dot.tie_exact_dot),
# and Triton caps a tensor at 2^20 elements: 64 x 128 x 128 at d = 128.
_INTERPRETER_BLOCK_N = 64


@triton.jit
def _rounded_cdist(x, dtype: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    """The official ``cdist(u, c) ** 2`` from its rounded GEMM output ``x`` (float32 holding ``dtype``
    values): clamp at 1e-30, sqrt, square, each rounded to ``dtype``. Non-decreasing in ``x``."""
    x = round_to(tl.maximum(x, 1e-30), dtype, BF16_BY_BITS)
    x = round_to(tl.sqrt_rn(x), dtype, BF16_BY_BITS)
    return round_to(x * x, dtype, BF16_BY_BITS)


@triton.jit
def _next_up(x, dtype: tl.constexpr):
    """The next ``dtype`` value above ``x`` (float32 holding a positive finite ``dtype`` value)."""
    if dtype == tl.float32:
        return (x.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True)
    elif dtype == tl.bfloat16:
        # A bf16 value is the high half of its float32 bits: one bf16 ulp is 1 << 16 there.
        return (x.to(tl.int32, bitcast=True) + 65536).to(tl.float32, bitcast=True)
    else:
        return (x.to(dtype).to(tl.int16, bitcast=True) + 1).to(dtype, bitcast=True).to(tl.float32)


@triton.jit
def _codebook_argmin_kernel(
    z_ptr,  # [n_rows, G*DIM], row stride stride_z_row, last dim contiguous
    ln_w_ptr,  # [G, DIM]
    ln_b_ptr,  # [G, DIM]
    cb_ptr,  # [G, num_codes, DIM]
    sqnorms_ptr,  # [G, num_codes]: float32 |c|^2 (EXACT), else the input dtype's rounded sum of squares
    ids_ptr,  # [n_rows, G] int64, output
    n_rows,
    num_codes,
    vocab_offset,
    eps,
    stride_z_row,
    stride_ln_w_group,
    stride_ln_w_dim,
    stride_ln_b_group,
    stride_ln_b_dim,
    stride_cb_group,
    stride_cb_code,
    stride_cb_dim,
    stride_sqnorms_group,
    stride_sqnorms_code,
    stride_ids_row,
    stride_ids_group,
    DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    EXACT: tl.constexpr,
    SPLIT: tl.constexpr,  # EXACT: parts of u in the codebook dtype (1: float32 codebook, float32 dot)
    UPCAST_DOT: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
):
    row_block = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1).to(tl.int64)
    in_dtype = z_ptr.dtype.element_ty

    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < DIM
    q_mask = row_mask[:, None] & dim_mask[None, :]

    # Per-group LayerNorm in float32; padded lanes are zeroed so they drop out of the moments and the dot.
    z = tl.load(
        z_ptr + rows[:, None] * stride_z_row + group * DIM + dims[None, :], mask=q_mask, other=0.0
    ).to(tl.float32)
    mean = tl.sum(z, axis=1) / DIM
    centered = tl.where(q_mask, z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(centered * centered, axis=1) / DIM + eps)
    ln_w = tl.load(
        ln_w_ptr + group * stride_ln_w_group + dims * stride_ln_w_dim, mask=dim_mask, other=0.0
    ).to(tl.float32)
    ln_b = tl.load(
        ln_b_ptr + group * stride_ln_b_group + dims * stride_ln_b_dim, mask=dim_mask, other=0.0
    ).to(tl.float32)
    u = centered * rstd[:, None] * ln_w[None, :] + ln_b[None, :]
    u = tl.where(q_mask, u, 0.0)

    if EXACT:
        if SPLIT > 1:
            # u = u_hi + u_mid (+ u_lo) in the codebook dtype, each part the rounded remainder of the
            # previous ones (exact float32 subtractions), so that the tile GEMM runs on tensor cores.
            cb_dtype = cb_ptr.dtype.element_ty
            u_hi = cast_rne(u, cb_dtype, BF16_BY_BITS)
            rest = u - u_hi.to(tl.float32)
            u_mid = cast_rne(rest, cb_dtype, BF16_BY_BITS)
            if SPLIT == 3:
                u_lo = cast_rne(rest - u_mid.to(tl.float32), cb_dtype, BF16_BY_BITS)
    else:
        # F.layer_norm rounds its output to the input dtype; |u|^2 is a sum of rounded squares, rounded.
        u = round_to(u, in_dtype, BF16_BY_BITS)
        u_sqnorm = tl.sum(round_to(u * u, in_dtype, BF16_BY_BITS), axis=1)
        u_sqnorm = round_to(u_sqnorm, in_dtype, BF16_BY_BITS)
        query = u * -2.0  # exact in any float dtype: the first block of the augmented GEMM operand
        query = query.to(in_dtype)  # exact; bf16 operands keep the GEMM on tensor cores

    # The official clamp of the distance (1e-30), as a value of the input dtype (reference mode).
    clamp = round_to(tl.full((BLOCK_N,), 1e-30, tl.float32), in_dtype, BF16_BY_BITS)
    best_dist = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_code = tl.zeros((BLOCK_N,), tl.int32)
    cb_group = cb_ptr + group * stride_cb_group
    for k0 in tl.range(0, num_codes, BLOCK_K, num_stages=NUM_STAGES):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_mask = codes < num_codes
        # The tile is loaded transposed ([BLOCK_D, BLOCK_K]) so that it is the right operand of the dot.
        codes_t = tl.load(
            cb_group + dims[:, None] * stride_cb_dim + codes[None, :].to(tl.int64) * stride_cb_code,
            mask=dim_mask[:, None] & code_mask[None, :],
            other=0.0,
        )
        # Exact mode: +inf past the last code makes their distance +inf (their dot is 0), one select
        # per element fewer than masking the distances.
        c_sqnorm = tl.load(
            sqnorms_ptr + group * stride_sqnorms_group + codes * stride_sqnorms_code,
            mask=code_mask,
            other=float("inf") if EXACT else 0.0,
        ).to(tl.float32)
        # Ties: the lowest code inside the tile, and a later tile wins only if strictly smaller.
        if EXACT:
            if SPLIT == 1:
                dot = tie_exact_dot(u, codes_t.to(tl.float32), UPCAST_DOT)
            else:
                # Smallest part first. The compiler folds each `acc + dot(a, b)` into one chain of
                # wgmma on a single float32 accumulator (no extra adds, no second accumulator).
                if SPLIT == 3:
                    dot = tie_exact_dot(u_lo, codes_t, UPCAST_DOT)
                    dot = dot + tie_exact_dot(u_mid, codes_t, UPCAST_DOT)
                else:
                    dot = tie_exact_dot(u_mid, codes_t, UPCAST_DOT)
                dot = dot + tie_exact_dot(u_hi, codes_t, UPCAST_DOT)
            dist = c_sqnorm[None, :] - 2.0 * dot
            tile_dist = tl.min(dist, axis=1)
            last_tied = tile_dist  # the codes at the tile's minimum distance: dist <= last_tied
        else:
            dot = tie_exact_dot(query, codes_t, UPCAST_DOT)
            # [-2u, |u|^2, 1] . [c, 1, |c|^2] accumulated in float32, rounded once to the input dtype.
            dist = round_to(dot + u_sqnorm[:, None] + c_sqnorm[None, :], in_dtype, BF16_BY_BITS)
            dist = tl.where(code_mask[None, :], dist, float("inf"))
            # The official distance is rounded_cdist(dist): clamp, sqrt and square, each rounded, a
            # non-decreasing map that merges neighbouring values (at most 3 consecutive ones of any
            # 16-bit or float32 format). Its argmin with the first-index rule is the first code whose
            # dist lies in the minimum's class [min, last_tied]: found per row from the tile minimum,
            # so the per-code work is one rounding instead of four and a square root.
            floor = tl.maximum(tl.min(dist, axis=1), clamp)
            tile_dist = _rounded_cdist(floor, in_dtype, BF16_BY_BITS)
            next_1 = _next_up(floor, in_dtype)
            tied_1 = _rounded_cdist(next_1, in_dtype, BF16_BY_BITS) == tile_dist
            next_2 = _next_up(next_1, in_dtype)
            tied_2 = tied_1 & (_rounded_cdist(next_2, in_dtype, BF16_BY_BITS) == tile_dist)
            last_tied = tl.where(tied_2, next_2, tl.where(tied_1, next_1, floor))
        tile_code = tl.min(tl.where(dist <= last_tied[:, None], codes[None, :], num_codes), axis=1)
        better = tile_dist < best_dist
        best_code = tl.where(better, tile_code, best_code)
        best_dist = tl.where(better, tile_dist, best_dist)

    ids = vocab_offset + group * num_codes + best_code.to(tl.int64)
    tl.store(ids_ptr + rows * stride_ids_row + group * stride_ids_group, ids, mask=row_mask)


# The interpreter (TRITON_INTERPRET=1 when the kernel was decorated) needs the workarounds below: a
# smaller row tile, another tile product and bf16 rounding on the bits.
_INTERPRETED = interpreted(_codebook_argmin_kernel)


def codebook_argmin(
    z: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    codebooks: torch.Tensor,
    codebook_sqnorms: torch.Tensor | None,
    ids: torch.Tensor,
    *,
    vocab_offset: int,
    mode: str,
    eps: float,
) -> None:
    """Fill ``ids [n, G]`` with ``vocab_offset + K*g + argmin_k dist(LN_g(z[:, g]), C_g[k])``.

    z [n, G*d] (last dim contiguous), ln_weight/ln_bias [G, d], codebooks [G, K, d], codebook_sqnorms
    [G, K] float32 (required for ``mode="exact"``, unused by ``"reference"``). Inputs are validated by
    ``kelix_fast.ops.codebook_argmin``; this launcher only sizes the grid and picks the constexprs.
    """
    n_rows = z.shape[0]
    num_groups, num_codes, dim = codebooks.shape
    if n_rows == 0:
        return
    exact = mode == "exact"
    assert mode in ("exact", "reference"), mode
    assert z.stride(-1) == 1, "z must have a contiguous last dim"
    assert not exact or codebook_sqnorms is not None, "mode='exact' needs codebook_sqnorms"
    block_n, block_k, num_warps, num_stages, split = _BLOCKS[exact, codebooks.dtype]
    block_d = max(_MIN_DOT_DIM, triton.next_power_of_2(dim))
    if split > 1 and block_d > 128:
        block_n, block_k, num_warps = _WIDE_EXACT_BLOCKS
    if _INTERPRETED:
        block_n = min(block_n, _INTERPRETER_BLOCK_N)
    # Reference mode: |c|^2 as the official cdist computes it (squares and sum in the input dtype),
    # once per call ([G, K], one pass over the codebooks) instead of once per code tile in every
    # program; and by torch's own sum, as the op's reference does.
    sqnorms = codebook_sqnorms if exact else codebooks.square().sum(-1)
    grid = (triton.cdiv(n_rows, block_n), num_groups)
    _codebook_argmin_kernel[grid](
        z,
        ln_weight,
        ln_bias,
        codebooks,
        sqnorms,
        ids,
        n_rows,
        num_codes,
        vocab_offset,
        eps,
        z.stride(0),
        ln_weight.stride(0),
        ln_weight.stride(1),
        ln_bias.stride(0),
        ln_bias.stride(1),
        codebooks.stride(0),
        codebooks.stride(1),
        codebooks.stride(2),
        sqnorms.stride(0),
        sqnorms.stride(1),
        ids.stride(0),
        ids.stride(1),
        DIM=dim,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
        NUM_STAGES=num_stages,
        EXACT=exact,
        SPLIT=split,
        # The interpreter needs another tile product (_dot.tie_exact_dot) and bf16 rounding (_rounding).
        UPCAST_DOT=_INTERPRETED,
        BF16_BY_BITS=_INTERPRETED,
        num_warps=num_warps,
    )
