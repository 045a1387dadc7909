"""Attention of query rows against a KV cache (``ops.cached_attention``): split-K flash-decoding.

``_decode_attention_kernel``, grid (B x Hkv, query tiles, key splits): one program takes one request, one
KV head and a tile of query rows, and packs the G = H / Hkv query heads of that KV head times BLOCK_M // G
query rows into the M dimension of its tiles (row ``m`` is query row ``m // G``, head ``m % G``), so that
every K/V tile is read once for the whole group (GQA) and a decode step (Lq = 1) still has G rows. It
streams its split of the key range through ``tl.dot`` in BLOCK_N-key tiles with a float32 online softmax
(scores in base 2: ``scale * log2(e)`` is folded into one multiply). The key range of a program ends at
``kv_lens[b]`` and, if causal, after the position of its last query row, both read on the device: a
program whose split lies beyond them reads no K/V at all. Nothing here reads tensor values on the host,
and the grid and the split count come from shapes only, so the launch is CUDA-graph safe.

With one split the kernel writes the output directly. With several, each split writes its normalised
float32 partial output and its log-sum-exp (``-inf`` for a split without keys) and
``_decode_attention_merge_kernel`` combines them: ``o = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max)``.

Numerics: scores, softmax and accumulation are float32. For bf16/fp16 inputs the probabilities are
rounded to the input dtype before the P @ V tensor-core dot (as every flash-attention kernel does), and the
output is rounded once. The interpreter rounds both to nearest even on the bits (``cast_rne``: its own
cast truncates) and multiplies in float32 (its bf16 dot is garbage, TOOLCHAIN.md trap 2). float32 inputs
stay IEEE float32 (no TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dot import dot
from ._rounding import cast_rne, interpreted

_LOG2E = 1.4426950408889634
# ~4 programs per SM on H100/H200 (132 SMs): the split count aims at this many programs in all, and a
# grid of B x Hkv x query tiles that already reaches it gets one split.
_TARGET_PROGRAMS = 528
# The merge holds [MAX_SPLITS, BLOCK_D] float32 per row in registers; beyond 64 splits of >= 1 tile the
# grid is full anyway.
_MAX_SPLITS = 64
_MIN_DOT_DIM = 16  # tl.dot needs M, N and K >= 16
MAX_HEAD_DIM = 256  # q and the accumulator [BLOCK_M, BLOCK_D] float32 live in registers
# (BLOCK_M_MAX, BLOCK_N, num_warps) per input dtype on a GPU. BLOCK_M is Lq x G rounded up to a power of
# two, at least 16 and G, capped at BLOCK_M_MAX; float32 tiles are twice as wide in shared memory, hence
# half the keys per tile. BLOCK_D is d rounded up to a power of two (at least 16).
_BLOCKS = {
    torch.bfloat16: (64, 64, 4),
    torch.float16: (64, 64, 4),
    torch.float32: (64, 32, 4),
}
# Under the interpreter every (program x loop iteration) costs milliseconds; small key tiles still let
# the tests reach several tiles, splits and query tiles with short caches.
_INTERPRETER_BLOCKS = (32, 16, 1)
_MERGE_WARPS = 4
_MERGE_ROWS_INTERPRETER = 256  # rows per merge program under the interpreter (one on a GPU)


@triton.jit
def _decode_attention_kernel(
    q_ptr,  # [B, Lq, H, d], last dim contiguous
    k_ptr,  # [B, S, Hkv, d], last dim contiguous
    v_ptr,  # [B, S, Hkv, d], last dim contiguous
    q_start_ptr,  # [B] int64: position of query row 0
    kv_lens_ptr,  # [B] int64 in [1, S]
    out_ptr,  # [B, Lq, H, d], output (one split only)
    part_o_ptr,  # [B, Lq, H, num_splits, d] float32 contiguous, output (several splits only)
    part_lse_ptr,  # [B, Lq, H, num_splits] float32 contiguous, base-2 log-sum-exp (several splits only)
    q_len,
    cache_len,
    num_kv_heads,
    dim,
    split_size,  # keys per split, a multiple of BLOCK_N
    num_splits,
    qk_scale,  # softmax scale x log2(e)
    stride_q_b,
    stride_q_l,
    stride_q_h,
    stride_k_b,
    stride_k_s,
    stride_k_h,
    stride_v_b,
    stride_v_s,
    stride_v_h,
    stride_out_b,
    stride_out_l,
    stride_out_h,
    stride_q_start,
    stride_kv_lens,
    GROUP: tl.constexpr,  # G = H / Hkv
    CAUSAL: tl.constexpr,
    SPLIT: tl.constexpr,  # num_splits > 1: write partials for the merge kernel
    BLOCK_M: tl.constexpr,  # query rows x heads per tile (>= GROUP)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
):
    request_head = tl.program_id(0).to(tl.int64)
    q_tile = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    b = request_head // num_kv_heads
    kv_head = request_head % num_kv_heads
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP

    m_idx = tl.arange(0, BLOCK_M)
    rows = q_tile * BLOCK_Q + m_idx // GROUP  # query row of each tile row
    heads = kv_head * GROUP + m_idx % GROUP  # query head of each tile row
    row_mask = (m_idx < BLOCK_Q * GROUP) & (rows < q_len)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < dim

    q = tl.load(
        q_ptr + b * stride_q_b + rows[:, None] * stride_q_l + heads[:, None] * stride_q_h + dims,
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )

    # This program's keys: its split, clipped to the request's cache length and, if causal, to the
    # position of its last query row. Empty when the split lies beyond: the loop then reads nothing.
    kv_len = tl.load(kv_lens_ptr + b * stride_kv_lens)
    key_start = split * split_size
    key_end = tl.minimum(tl.minimum(key_start + split_size, cache_len), kv_len)
    if CAUSAL:
        q_start = tl.load(q_start_ptr + b * stride_q_start)
        positions = q_start + rows
        last_row = tl.minimum(q_tile * BLOCK_Q + BLOCK_Q, q_len) - 1
        key_end = tl.minimum(key_end, q_start + last_row + 1)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    k_base = k_ptr + b * stride_k_b + kv_head * stride_k_h
    v_base = v_ptr + b * stride_v_b + kv_head * stride_v_h
    for n0 in range(key_start, key_end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_mask = keys < key_end
        kv_mask = key_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_base + keys[:, None] * stride_k_s + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_v_s + dims[None, :], mask=kv_mask, other=0.0)
        scores = dot(q, tl.trans(k), UPCAST_DOT) * qk_scale  # [BLOCK_M, BLOCK_N]
        visible = key_mask[None, :]
        if CAUSAL:
            visible = visible & (keys[None, :] <= positions[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        # A row that has seen no visible key yet keeps m = -inf; shift it by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(scores - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p_v = cast_rne(p, v_ptr.dtype.element_ty, BF16_BY_BITS)
        acc = acc * alpha[:, None] + dot(p_v, v, UPCAST_DOT)
        m_i = m_new

    # A split without visible keys has o = 0 and lse = -inf (no weight in the merge).
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if SPLIT:
        part_row = (b * q_len + rows) * (
            num_kv_heads * GROUP
        ) + heads  # [BLOCK_M] row of [B, Lq, H]
        part = part_row * num_splits + split
        tl.store(
            part_o_ptr + part[:, None] * dim + dims[None, :],
            o,
            mask=row_mask[:, None] & dim_mask[None, :],
        )
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=row_mask)
    else:
        out = out_ptr + b * stride_out_b + rows[:, None] * stride_out_l
        tl.store(
            out + heads[:, None] * stride_out_h + dims[None, :],
            cast_rne(o, out_ptr.dtype.element_ty, BF16_BY_BITS),
            mask=row_mask[:, None] & dim_mask[None, :],
        )


@triton.jit
def _decode_attention_merge_kernel(
    part_o_ptr,  # [n_rows, num_splits, d] float32 contiguous (n_rows = B x Lq x H)
    part_lse_ptr,  # [n_rows, num_splits] float32 contiguous
    out_ptr,  # [B, Lq, H, d], output
    n_rows,
    q_len,
    num_heads,
    dim,
    num_splits,
    stride_out_b,
    stride_out_l,
    stride_out_h,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
):
    row_block = tl.program_id(0).to(tl.int64)
    rows = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    splits = tl.arange(0, BLOCK_SPLITS)
    dims = tl.arange(0, BLOCK_D)
    part = rows[:, None] * num_splits + splits[None, :]  # [BLOCK_ROWS, BLOCK_SPLITS]
    part_mask = row_mask[:, None] & (splits < num_splits)[None, :]
    lse = tl.load(part_lse_ptr + part, mask=part_mask, other=float("-inf"))
    top = tl.max(lse, axis=1)
    # A real row sees key 0 in split 0 (kv_lens >= 1, q_start >= 0), so its top is finite; padded rows
    # (no split with keys) shift by 0 and divide by 1, keeping NaN out of the arithmetic.
    weights = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top)[:, None])
    o_mask = part_mask[:, :, None] & (dims < dim)[None, None, :]
    o = tl.load(part_o_ptr + part[:, :, None] * dim + dims[None, None, :], mask=o_mask, other=0.0)
    total = tl.sum(weights, axis=1)
    merged = tl.sum(weights[:, :, None] * o, axis=1) / tl.where(total > 0.0, total, 1.0)[:, None]

    b = rows // (q_len * num_heads)
    row_in_request = rows % (q_len * num_heads)
    out = out_ptr + b * stride_out_b + (row_in_request // num_heads) * stride_out_l
    out = out + (row_in_request % num_heads) * stride_out_h
    tl.store(
        out[:, None] + dims[None, :],
        cast_rne(merged, out_ptr.dtype.element_ty, BF16_BY_BITS),
        mask=row_mask[:, None] & (dims < dim)[None, :],
    )


def plan(
    batch: int,
    q_len: int,
    num_heads: int,
    num_kv_heads: int,
    cache_len: int,
    dim: int,
    dtype: torch.dtype,
) -> dict[str, int]:
    """Tile sizes, the query-tile count and the key split of a call, from shapes only (no device values).

    Returns ``block_m, block_n, block_d, num_warps, q_tiles, split_size, num_splits``.
    """
    group = num_heads // num_kv_heads
    if interpreted(_decode_attention_kernel):
        block_m_max, block_n, num_warps = _INTERPRETER_BLOCKS
    else:
        block_m_max, block_n, num_warps = _BLOCKS[dtype]
    wanted_m = min(block_m_max, triton.next_power_of_2(q_len * group))
    block_m = max(_MIN_DOT_DIM, triton.next_power_of_2(group), wanted_m)
    q_tiles = triton.cdiv(q_len, block_m // group)
    key_tiles = max(1, triton.cdiv(cache_len, block_n))
    programs = batch * num_kv_heads * q_tiles
    wanted_splits = min(_MAX_SPLITS, key_tiles, triton.cdiv(_TARGET_PROGRAMS, programs))
    tiles_per_split = triton.cdiv(key_tiles, wanted_splits)
    return {
        "block_m": block_m,
        "block_n": block_n,
        "block_d": max(_MIN_DOT_DIM, triton.next_power_of_2(dim)),
        "num_warps": num_warps,
        "q_tiles": q_tiles,
        "split_size": tiles_per_split * block_n,
        "num_splits": triton.cdiv(key_tiles, tiles_per_split),
    }


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_start: torch.Tensor,
    kv_lens: torch.Tensor,
    out: torch.Tensor,
    *,
    causal: bool,
    scale: float,
) -> None:
    """Fill ``out [B, Lq, H, d]`` with the queries' attention over their caches (``ops.cached_attention``).

    q [B, Lq, H, d], k_cache/v_cache [B, S, Hkv, d] (last dims contiguous), q_start/kv_lens [B] int64,
    out like q. Inputs are validated by the op; this launcher allocates only the split partials
    ([B, Lq, H, splits, d] float32 and their log-sum-exp) and never reads tensor values on the host.
    """
    batch, q_len, num_heads, dim = q.shape
    cache_len, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if out.numel() == 0:
        return
    assert dim == 1 or all(t.stride(-1) == 1 for t in (q, k_cache, v_cache, out)), "strided d"
    assert dim <= MAX_HEAD_DIM, f"head dim {dim} > {MAX_HEAD_DIM}"
    interpreter = interpreted(_decode_attention_kernel)
    p = plan(batch, q_len, num_heads, num_kv_heads, cache_len, dim, q.dtype)
    num_splits = p["num_splits"]
    if num_splits > 1:
        part_o = torch.empty(
            batch, q_len, num_heads, num_splits, dim, dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty(
            batch, q_len, num_heads, num_splits, dtype=torch.float32, device=q.device
        )
    else:
        part_o = part_lse = out  # placeholder pointers, never touched with one split
    _decode_attention_kernel[(batch * num_kv_heads, p["q_tiles"], num_splits)](
        q,
        k_cache,
        v_cache,
        q_start,
        kv_lens,
        out,
        part_o,
        part_lse,
        q_len,
        cache_len,
        num_kv_heads,
        dim,
        p["split_size"],
        num_splits,
        scale * _LOG2E,
        *q.stride()[:3],
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        *out.stride()[:3],
        q_start.stride(0),
        kv_lens.stride(0),
        GROUP=num_heads // num_kv_heads,
        CAUSAL=causal,
        SPLIT=num_splits > 1,
        BLOCK_M=p["block_m"],
        BLOCK_N=p["block_n"],
        BLOCK_D=p["block_d"],
        UPCAST_DOT=interpreter,
        BF16_BY_BITS=interpreter,
        num_warps=p["num_warps"],
    )
    if num_splits == 1:
        return
    n_rows = batch * q_len * num_heads
    merge_rows = _MERGE_ROWS_INTERPRETER if interpreter else 1
    _decode_attention_merge_kernel[(triton.cdiv(n_rows, merge_rows),)](
        part_o,
        part_lse,
        out,
        n_rows,
        q_len,
        num_heads,
        dim,
        num_splits,
        *out.stride()[:3],
        BLOCK_ROWS=merge_rows,
        BLOCK_SPLITS=triton.next_power_of_2(num_splits),
        BLOCK_D=p["block_d"],
        BF16_BY_BITS=interpreter,
        num_warps=_MERGE_WARPS,
    )
