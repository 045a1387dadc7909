"""Masked softmax cross-attention of the DiT (kelix-dit.md §3.5.2, §9.5), flash style.

``_cross_attention_kernel``, grid (query blocks, B*H): one program holds BLOCK_M queries of one (batch,
head) and streams the keys and values in BLOCK_N tiles with an online softmax (running max ``m``, running
sum ``l``, float32 accumulator), so the [Lq, Lk] scores never exist in memory. The head dim is padded to
BLOCK_D (112 -> 128 at full scale) with zero lanes, which add nothing to any dot.

Scores are ``q.k * scale`` in float32, then the official additive bias: ``mask_bias`` (-10000 rounded
to the input dtype, -9984 in bf16) on masked keys, 0 on valid ones. Keys after the last valid key of
a sample are skipped when the sample has a valid key: there ``exp(s + mask_bias - m)`` underflows to
exactly 0 in float32 (the running max ``m`` is at least the score of a valid key), so each skipped key
would add exactly 0 to ``l`` and to the accumulator, and ``m`` (the largest score, a valid one) does not
change. This holds while every score lies within about 9,860 of the valid keys' scores (for instance all
|scores| < 4,900) and the skipped K/V rows are finite (0 * NaN would be NaN in the reference). A sample
with no valid key keeps the reference semantics: every key is visited with the same bias, so the row
attends to all keys as if none were masked, up to the float32 rounding of scores near -10000 (about
1e-3), which the reference has too. In the engine's right-padded condition only
``ceil(valid / BLOCK_N)`` key tiles are read (6 of 12 tiles for 326 of 720 rows in bf16); masked keys
before the last valid key are computed with the bias, as in the reference.

Numerics: bf16/fp16 ``q k^T`` and ``p v`` run on tensor cores with float32 accumulation (``p`` rounded to
the value dtype for the second product, as flash kernels do); float32 inputs use ``ieee`` dots (no TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dot import dot
from ._rounding import cast_rne, interpreted

# (BLOCK_M queries, BLOCK_N keys, num_warps) keyed by dtype on a GPU; BLOCK_D is the head dim rounded up
# to a power of two (at least 16, the smallest tl.dot dim). Chosen without a GPU as the largest tiles that
# ptxas (sm_90a, BLOCK_D 128) fits in registers without spilling: 128-query bf16 tiles hit the 255-register
# cap and spill, and float32 dots run on FMA units with operands in registers. Not tuned on hardware.
_BLOCKS = {
    torch.bfloat16: (64, 64, 4),
    torch.float16: (64, 64, 4),
    torch.float32: (32, 32, 4),
}
# Under the interpreter every (program x loop iteration) costs milliseconds; 64 keep several key tiles
# (and so the online-softmax rescaling) in play at the tests' sizes.
_INTERPRETER_BLOCKS = (64, 64, 1)
_MIN_DOT_DIM = 16
_MAX_SCAN_BLOCK = 1024  # mask lanes per step of the last-valid-key scan (one step for Lk <= 1024)


@triton.jit
def _cross_attention_kernel(
    q_ptr,  # [B, Lq, H, d], strides stride_q_*
    k_ptr,  # [B, Lk, H, d], strides stride_k_*
    v_ptr,  # [B, Lk, H, d], strides stride_v_*
    mask_ptr,  # [B, Lk] uint8 (a bool tensor's bytes), nonzero = valid key
    out_ptr,  # [B, Lq, H, d], strides stride_out_*, output
    q_len,
    k_len,
    num_heads,
    head_dim,
    scale,
    mask_bias,  # the official -10000, rounded to the input dtype
    stride_q_b,
    stride_q_l,
    stride_q_h,
    stride_q_d,
    stride_k_b,
    stride_k_l,
    stride_k_h,
    stride_k_d,
    stride_v_b,
    stride_v_l,
    stride_v_h,
    stride_v_d,
    stride_mask_b,
    stride_mask_l,
    stride_out_b,
    stride_out_l,
    stride_out_h,
    stride_out_d,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
):
    q_block = tl.program_id(0).to(tl.int64)
    batch_head = tl.program_id(1).to(tl.int64)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    mask_row = mask_ptr + batch * stride_mask_b

    # One past the last valid key (0 when none is valid): the key loop stops there (see the module doc).
    bound = 0
    for j0 in range(0, k_len, SCAN_BLOCK):
        keys = j0 + tl.arange(0, SCAN_BLOCK)
        valid = tl.load(mask_row + keys * stride_mask_l, mask=keys < k_len, other=0) != 0
        bound = tl.maximum(bound, tl.max(tl.where(valid, keys + 1, 0)))
    n_keys = tl.where(bound > 0, bound, k_len)

    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = (rows < q_len)[:, None] & dim_mask[None, :]
    q_tile = q_ptr + batch * stride_q_b + head * stride_q_h + dims[None, :] * stride_q_d
    q = tl.load(q_tile + rows[:, None] * stride_q_l, mask=row_mask, other=0.0)
    k_tile = k_ptr + batch * stride_k_b + head * stride_k_h + dims[None, :] * stride_k_d
    v_tile = v_ptr + batch * stride_v_b + head * stride_v_h + dims[None, :] * stride_v_d

    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)  # the running softmax sum (flash-attention's name)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for j0 in range(0, n_keys, BLOCK_N):
        keys = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
        in_range = keys < k_len
        kv_mask = in_range[:, None] & dim_mask[None, :]
        k = tl.load(k_tile + keys[:, None] * stride_k_l, mask=kv_mask, other=0.0)
        v = tl.load(v_tile + keys[:, None] * stride_v_l, mask=kv_mask, other=0.0)
        scores = dot(q, tl.trans(k), UPCAST_DOT) * scale  # [BLOCK_M, BLOCK_N]
        valid = tl.load(mask_row + keys * stride_mask_l, mask=in_range, other=0) != 0
        scores = tl.where(valid[None, :], scores, scores + mask_bias)
        scores = tl.where(in_range[None, :], scores, float("-inf"))
        m_next = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_next)  # 0 on the first tile (m = -inf)
        p = tl.exp(scores - m_next[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        # P in the value dtype on a GPU, as flash kernels feed the tensor cores; the interpreter keeps
        # float32 P (its bf16 cast truncates: _rounding).
        if not UPCAST_DOT:
            p = p.to(v.dtype)
        acc = acc * alpha[:, None] + dot(p, v, UPCAST_DOT)
        m = m_next

    out = acc / l[:, None]
    out_tile = out_ptr + batch * stride_out_b + head * stride_out_h + dims[None, :] * stride_out_d
    tl.store(
        out_tile + rows[:, None] * stride_out_l,
        cast_rne(out, out_ptr.dtype.element_ty, BF16_BY_BITS),
        mask=row_mask,
    )


def blocks(dtype: torch.dtype, interpreter: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the launch."""
    return _INTERPRETER_BLOCKS if interpreter else _BLOCKS[dtype]


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor,
    scale: float,
    mask_bias: float,
    out: torch.Tensor,
) -> None:
    """Fill ``out`` with ``softmax(q k^T * scale + bias) v`` (``kelix_fast.ops.cross_attention``).

    q, out: [B, Lq, H, d]; k, v: [B, Lk, H, d] (Lk >= 1); one float dtype, any strides; key_mask
    [B, Lk] bool; validated by the op (d <= 128, B*H <= 65535). ``mask_bias`` is the bias of a masked
    key, already rounded to the input dtype. Allocates nothing; never reads tensor values on the host.
    """
    batch, q_len, num_heads, head_dim = q.shape
    k_len = k.shape[1]
    if out.numel() == 0:
        return
    interpreter = interpreted(_cross_attention_kernel)
    block_m, block_n, num_warps = blocks(q.dtype, interpreter)
    # The bool mask's own bytes (a view, no copy): Triton loads uint8 more portably than int1.
    mask_bytes = key_mask.view(torch.uint8)
    grid = (triton.cdiv(q_len, block_m), batch * num_heads)
    _cross_attention_kernel[grid](
        q,
        k,
        v,
        mask_bytes,
        out,
        q_len,
        k_len,
        num_heads,
        head_dim,
        scale,
        mask_bias,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *mask_bytes.stride(),
        *out.stride(),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(_MIN_DOT_DIM, triton.next_power_of_2(head_dim)),
        SCAN_BLOCK=min(_MAX_SCAN_BLOCK, triton.next_power_of_2(k_len)),
        UPCAST_DOT=interpreter,
        BF16_BY_BITS=interpreter,
        num_warps=num_warps,
    )
