"""SANA ReLU linear attention (kelix-dit.md §3.5.1, §9.5) in two passes over strided [B, N, H, d] views.

1. ``_linear_attention_state_kernel``, grid (B*H, splits): each program reduces one contiguous share of
   the N tokens of one (batch, head) to a partial state ``kv = sum_j relu(k_j)^T v_j`` [d, d] and key sum
   ``z = sum_j relu(k_j)`` [d], in float32, into a scratch buffer. At full scale B*H = 140 (B=2, 70
   heads): one program per head would leave most of an H100's 132 SMs with a single short program, so
   N is split until there are about four programs per SM.
2. ``_linear_attention_out_kernel``, grid (B*H, query blocks): sums the partial states in split order
   (deterministic, no atomics), then ``out_i = relu(q_i) kv / (relu(q_i) . z + eps)`` for a tile of
   queries, rounded once to the output dtype.

The state is tiny (32 x 32 float32 at d=32), so the second pass re-reads it per query tile from L2
instead of a third reduction launch. q, k and v are read through their own four strides: the model
passes per-head views of its projections, never copies.

Numerics: bf16/fp16 ``relu(k)^T v`` runs on tensor cores (products of 16-bit values are exact in
float32, sums in float32); float32 inputs and every product with the float32 state use ``ieee`` dots
(no TF32), as the reference's float32 einsums do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dot import dot
from ._rounding import cast_rne, interpreted

# Tokens per tile in both passes. d is padded to BLOCK_D = next power of two, at least 16 (the smallest
# tl.dot dim); the kernels are meant for head dims up to 128 (the op refuses larger ones).
_BLOCK_N = 64
_MIN_DOT_DIM = 16
_NUM_WARPS = 4
_TARGET_PROGRAMS = 528  # ~4 programs per SM on H100/H200 (132 SMs)
# Under the interpreter every (program x loop iteration) costs milliseconds: few programs, yet more than
# one split at the tests' sizes, so the partial-state sum is exercised.
_INTERPRETER_TARGET_PROGRAMS = 16


@triton.jit
def _linear_attention_state_kernel(
    k_ptr,  # [B, N, H, d], strides stride_k_*
    v_ptr,  # [B, N, H, d], strides stride_v_*
    kv_ptr,  # [B*H, num_splits, BLOCK_D, BLOCK_D] float32 contiguous, output: partial relu(k)^T v
    z_ptr,  # [B*H, num_splits, BLOCK_D] float32 contiguous, output: partial sum of relu(k)
    n_tokens,
    num_heads,
    head_dim,
    split_size,  # tokens per split, a multiple of BLOCK_N
    stride_k_b,
    stride_k_n,
    stride_k_h,
    stride_k_d,
    stride_v_b,
    stride_v_n,
    stride_v_h,
    stride_v_d,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    batch_head = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    num_splits = tl.num_programs(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    k_base = k_ptr + batch * stride_k_b + head * stride_k_h + dims[None, :] * stride_k_d
    v_base = v_ptr + batch * stride_v_b + head * stride_v_h + dims[None, :] * stride_v_d

    kv = tl.zeros((BLOCK_D, BLOCK_D), tl.float32)
    z = tl.zeros((BLOCK_D,), tl.float32)
    start = split * split_size
    end = tl.minimum(start + split_size, n_tokens)
    for n0 in range(start, end, BLOCK_N):
        tokens = n0 + tl.arange(0, BLOCK_N)
        mask = (tokens < end)[:, None] & dim_mask[None, :]
        # Padded lanes load 0: relu(0) = 0 adds nothing to kv or z.
        k = tl.load(k_base + tokens[:, None] * stride_k_n, mask=mask, other=0.0)
        v = tl.load(v_base + tokens[:, None] * stride_v_n, mask=mask, other=0.0)
        k = tl.where(k > 0, k, tl.zeros_like(k))  # ReLU in the input dtype: exact
        kv += dot(tl.trans(k), v, UPCAST_DOT)
        z += tl.sum(k.to(tl.float32), axis=0)

    slot = batch_head * num_splits + split
    tl.store(kv_ptr + slot * BLOCK_D * BLOCK_D + dims[:, None] * BLOCK_D + dims[None, :], kv)
    tl.store(z_ptr + slot * BLOCK_D + dims, z)


@triton.jit
def _linear_attention_out_kernel(
    q_ptr,  # [B, N, H, d], strides stride_q_*
    kv_ptr,  # [B*H, num_splits, BLOCK_D, BLOCK_D] float32, from the state kernel
    z_ptr,  # [B*H, num_splits, BLOCK_D] float32, from the state kernel
    out_ptr,  # [B, N, H, d], strides stride_out_*, output
    n_tokens,
    num_heads,
    head_dim,
    num_splits,
    eps,
    stride_q_b,
    stride_q_n,
    stride_q_h,
    stride_q_d,
    stride_out_b,
    stride_out_n,
    stride_out_h,
    stride_out_d,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
):
    batch_head = tl.program_id(0).to(tl.int64)
    token_block = tl.program_id(1).to(tl.int64)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    dims = tl.arange(0, BLOCK_D)

    kv = tl.zeros((BLOCK_D, BLOCK_D), tl.float32)
    z = tl.zeros((BLOCK_D,), tl.float32)
    for split in range(num_splits):
        slot = batch_head * num_splits + split
        kv += tl.load(kv_ptr + slot * BLOCK_D * BLOCK_D + dims[:, None] * BLOCK_D + dims[None, :])
        z += tl.load(z_ptr + slot * BLOCK_D + dims)

    tokens = token_block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (tokens < n_tokens)[:, None] & (dims < head_dim)[None, :]
    q_tile = q_ptr + batch * stride_q_b + head * stride_q_h
    q = tl.load(
        q_tile + tokens[:, None] * stride_q_n + dims[None, :] * stride_q_d, mask=mask, other=0.0
    ).to(tl.float32)
    q = tl.maximum(q, 0.0)
    numerator = tl.dot(q, kv, input_precision="ieee")  # [BLOCK_N, BLOCK_D]
    denominator = tl.sum(q * z[None, :], axis=1) + eps
    out = tl.div_rn(numerator, denominator[:, None])
    out_dtype = out_ptr.dtype.element_ty
    out_tile = out_ptr + batch * stride_out_b + head * stride_out_h
    tl.store(
        out_tile + tokens[:, None] * stride_out_n + dims[None, :] * stride_out_d,
        cast_rne(out, out_dtype, BF16_BY_BITS),
        mask=mask,
    )


def plan(n_tokens: int, batch_heads: int, interpreter: bool) -> tuple[int, int]:
    """(split_size, num_splits) of the token reduction: about the target program count, whole tiles."""
    tiles = triton.cdiv(n_tokens, _BLOCK_N)
    target = _INTERPRETER_TARGET_PROGRAMS if interpreter else _TARGET_PROGRAMS
    wanted = min(tiles, max(1, triton.cdiv(target, batch_heads)))
    split_size = triton.cdiv(tiles, wanted) * _BLOCK_N
    return split_size, triton.cdiv(n_tokens, split_size)


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float, out: torch.Tensor
) -> None:
    """Fill ``out`` [B, N, H, d] with ``relu(q) S / (relu(q) . z + eps)`` (``kelix_fast.ops.linear_attention``).

    q, k, v, out: [B, N, H, d], one float dtype, any strides, validated by the op (d <= 128). This
    launcher allocates only its float32 scratch (the partial states, B*H*splits*(BLOCK_D+1)*BLOCK_D).
    """
    batch, n_tokens, num_heads, head_dim = q.shape
    if out.numel() == 0:
        return
    interpreter = interpreted(_linear_attention_state_kernel)
    block_d = max(_MIN_DOT_DIM, triton.next_power_of_2(head_dim))
    batch_heads = batch * num_heads
    split_size, num_splits = plan(n_tokens, batch_heads, interpreter)
    kv = torch.empty(
        batch_heads, num_splits, block_d, block_d, dtype=torch.float32, device=q.device
    )
    z = torch.empty(batch_heads, num_splits, block_d, dtype=torch.float32, device=q.device)
    _linear_attention_state_kernel[(batch_heads, num_splits)](
        k,
        v,
        kv,
        z,
        n_tokens,
        num_heads,
        head_dim,
        split_size,
        *k.stride(),
        *v.stride(),
        BLOCK_N=_BLOCK_N,
        BLOCK_D=block_d,
        UPCAST_DOT=interpreter,
        num_warps=_NUM_WARPS,
    )
    _linear_attention_out_kernel[(batch_heads, triton.cdiv(n_tokens, _BLOCK_N))](
        q,
        kv,
        z,
        out,
        n_tokens,
        num_heads,
        head_dim,
        num_splits,
        eps,
        *q.stride(),
        *out.stride(),
        BLOCK_N=_BLOCK_N,
        BLOCK_D=block_d,
        BF16_BY_BITS=interpreter,
        num_warps=_NUM_WARPS,
    )
