"""Flash attention over packed variable-length sequences with block-structured masks (``ops.attention``).

One program owns BLOCK_M query rows of one sequence and one query head, and streams the keys of that
sequence through an online softmax (running max ``m``, running sum ``l``, float32 accumulator), so the
[T, T] scores never exist in memory. Query head ``h`` reads KV head ``h // (H / Hkv)``: K/V are never
expanded. Scores are in base 2 (``qk_scale`` is pre-multiplied by log2 e), except with a key bias, where
they stay in natural units (see ``_attend_key_tile``).

Every mask of the op is "query row ``i`` sees the keys ``j < key_end(i)`` of its sequence" (positions
relative to the sequence start), optionally intersected with a per-key mask:

* ``BIDIRECTIONAL``: ``key_end(i) = len``;
* ``CAUSAL``: ``key_end(i) = i + 1``;
* ``KEY_END``: ``key_end(i)`` read from a per-row table (block-causal over runs of equal block ids: the
  end of ``i``'s block);
* ``BLOCK_CAUSAL``: ``key_end(i) = min((i // block_size + 1) * block_size, len)``, computed in the kernel
  (block-causal over blocks of ``block_size`` rows: no table to build, no per-row loads);
* ``KEY_RANGE``: keys ``key_start(i) <= j < key_end(i)``, both from per-row tables: many short sequences
  (the Block Decoder's 9-slot ones) run as one pack whose rows see only their own sequence, so that a
  program covers 64 rows of several sequences instead of 9 rows of one (see ``PACK_MAX_SEQLEN``).

``key_end`` never decreases along a sequence, so for the tile of rows ``[m0, m1)`` the keys below
``key_end(m0)`` are visible to every row: the whole key tiles below it run without the structure mask,
the tiles from there up to ``key_end(m1 - 1)`` run with it (the causal diagonal, the block edges, the
sequence end), and the keys beyond are never read. A tile runs masked exactly when some row of the
query tile does not see all of its keys, so no split does fewer masked tiles. Under ``KEY_RANGE``
(``key_start`` non-decreasing too) every tile runs masked, from the tile holding ``key_start(m0)``.
Keys of another sequence are never read (every load is masked to the sequence).

Both kinds of key tile run in one loop, the structure mask behind a branch that is uniform across the
program. Two loops (unmasked, then masked) made ptxas serialize every wgmma of the kernel on sm_90a
(C7515, "non wgmma instructions defining accumulator registers": Triton keeps the last P V wgmma of the
first loop in flight past its exit, where the zero-trip path copies the accumulator): each HGMMA then
waited for the previous one (``WARPGROUP.DEPBAR`` after every HGMMA in the SASS). With one loop the Q K^T
and P V chains issue back to back, one wait per chain (tests/build checks the ptxas log).

Hopper (sm_90a, Triton 3.6), measured on the compile only (registers, shared memory, SASS):

* wgmma: every 16-bit tile product is a wgmma (64-row warpgroup tiles; P stays in registers as the A
  operand of P V). Triton keeps the P V chain of one tile in flight while the next tile's Q K^T chain
  issues (``wgmma.wait_group 0`` after Q K^T); the softmax itself does not overlap a wgmma.
* ``tl.range(..., warp_specialize=True)`` compiles to the same SASS on sm_90a as without it (no
  ``setmaxnreg``, no producer warps): Triton 3.6 warp-specializes only on Blackwell. Not used.
* TMA: tensor descriptors (host ``TensorDescriptor`` or ``tl.make_tensor_descriptor``) compile to
  ``UTMALDG``; in a reduced kernel of the same loop they took 138 registers instead of 170 with
  pointer loads at 128 x 64 tiles, 187 instead of 254 at 128 x 128. Not used yet: a descriptor over
  the whole [T, Hkv, d] tensor reads keys of the neighbouring sequence (finite values times p = 0 are
  harmless, an Inf there would give NaN); exact per-sequence bounds need device-side descriptors,
  which need a global scratch allocator (``triton.set_allocator``: process-wide, called at every
  launch, which CUDA-graph capture must see); and strides that are not multiples of 16 bytes (fused
  projections) need this pointer path anyway.
* Loads are ``cp.async`` 16-byte copies (``STRIDE_ALIGN``) into a ring of ``num_stages`` = 3
  (Triton's default) K/V tiles.

A row whose keys are all excluded (only possible with a key mask without bias) has ``l = 0`` and
outputs zeros. The grid is (query tiles of every sequence x heads), sized from ``max_seqlen`` without
reading ``cu_seqlens`` on the host; programs past the end of their sequence return at once.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._dot import dot
from ._rounding import cast_rne, interpreted

# Structure masks (the MASK constexpr).
BIDIRECTIONAL = 0
CAUSAL = 1
KEY_END = 2
KEY_RANGE = 3
BLOCK_CAUSAL = 4
# Sequences up to this long, when there are several, run as one pack under KEY_RANGE: a 16-row tile per
# sequence (the Block Decoder's 9 slots) would launch one tiny program per sequence and head.
PACK_MAX_SEQLEN = 16
# Key masks (the KEY_MASK constexpr): none, False keys excluded, False keys biased.
_NO_KEY_MASK = 0
_KEY_MASK_EXCLUDE = 1
_KEY_MASK_BIAS = 2

MAX_HEAD_DIM = 256  # the head dims are one or two power-of-two column blocks (head_dim_blocks)
_MIN_DOT_DIM = 16  # the smallest K-dim of tl.dot
_VECTOR_BYTES = 16  # the widest global load (and cp.async) of one thread
_LOG2E = tl.constexpr(math.log2(math.e))

# (BLOCK_M, BLOCK_N, num_warps) on a GPU, keyed by (float32 inputs, BLOCK_D). Hopper: hd 128 in bf16
# takes 128 x 64 tiles over 8 warps (96 KB of shared memory in the sm_90a build; tests/build checks
# that every configuration fits). Float32 tiles are twice the bytes and run the IEEE FMA path, hence
# the smaller tiles. Not tuned on a GPU yet.
_BLOCKS = {
    (False, 16): (128, 64, 4),
    (False, 32): (128, 64, 4),
    (False, 64): (128, 64, 4),
    (False, 128): (128, 64, 8),
    (False, 256): (64, 32, 8),
    (True, 16): (64, 32, 4),
    (True, 32): (64, 32, 4),
    (True, 64): (64, 32, 4),
    (True, 128): (32, 32, 4),
    (True, 256): (16, 32, 4),
}
# A padded 16-bit head dim (112 -> BLOCK_D 128) holds 128-wide registers for less useful work: half the
# query rows, 4 warps.
_PADDED_128 = (64, 64, 4)
# A 16-bit head dim split in two column blocks (ViT 72 -> 64 + 16): 80 columns, the 128-row tiles of
# hd 64 over 8 warps. Not tuned on a GPU yet.
_SPLIT_16BIT = (128, 64, 8)
# A KEY_RANGE pack: a 64-row tile of short sequences sees at most 64 + 15 keys, 3 tiles of 32.
_PACKED = {False: (64, 32, 4), True: (32, 32, 4)}
# Under the interpreter every (program x loop iteration) costs milliseconds: few, wide tiles. BLOCK_M
# differs from BLOCK_N so that the tests see tile edges that do not line up.
INTERPRETER_BLOCKS = (64, 32)


def block_d(head_dim: int) -> int:
    return max(_MIN_DOT_DIM, triton.next_power_of_2(head_dim))


def head_dim_blocks(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D2): the head dims as one power-of-two column block (BLOCK_D2 = 0), or as two
    when that wastes less tensor-core work: 72 -> (64, 16) (80 columns instead of 128), 96 -> (64, 32),
    but 112 -> (128, 0) (64 + 64 would save nothing)."""
    whole = block_d(head_dim)
    first = max(_MIN_DOT_DIM, whole // 2)
    if head_dim <= first:
        return whole, 0
    second = block_d(head_dim - first)
    return (first, second) if first + second < whole else (whole, 0)


def stride_alignment(*tensors: torch.Tensor) -> int:
    """STRIDE_ALIGN of a launch: the largest power of two, at most one 16-byte vector of elements, that
    divides every token and head stride of ``tensors`` ([T, H, d] each); 1 unless every head-dim stride
    is 1 (then there is nothing contiguous to vectorize)."""
    width = _VECTOR_BYTES // tensors[0].element_size()
    for t in tensors:
        if t.stride(-1) != 1:
            return 1
        for stride in t.stride()[:-1]:
            while stride % width:
                width //= 2
    return width


def _scaled_strides(t: torch.Tensor, align: int) -> tuple[int, int, int]:
    """(token, head, dim) strides of ``t`` with the first two divided by ``align`` (exact)."""
    return t.stride(0) // align, t.stride(1) // align, t.stride(2)


def blocks(
    float32: bool, head_dim: int, max_seqlen: int, interpreter: bool
) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of a launch.

    Tiles are never taller or wider than the longest sequence rounded up to a power of two (at least
    16): packed 9-slot Block Decoder sequences take 16 x 16 tiles instead of wasting 127 of 128 rows.
    """
    width, second = head_dim_blocks(head_dim)
    if interpreter:
        block_m, block_n, num_warps = (*INTERPRETER_BLOCKS, 4)
    elif second and not float32:
        block_m, block_n, num_warps = _SPLIT_16BIT
    elif not float32 and width == 128 and head_dim != width:
        block_m, block_n, num_warps = _PADDED_128
    else:
        block_m, block_n, num_warps = _BLOCKS[(float32, width)]
    fit = max(_MIN_DOT_DIM, triton.next_power_of_2(max_seqlen))
    if fit < block_m:
        block_m, num_warps = fit, min(num_warps, 4)
    return block_m, min(block_n, fit), num_warps


@triton.jit
def _attend_key_tile(
    acc,  # [BLOCK_M, BLOCK_D] float32
    l_i,  # [BLOCK_M] float32
    m_i,  # [BLOCK_M] float32
    acc2,  # [BLOCK_M, BLOCK_D2] float32: the head dims from BLOCK_D on (SPLIT only)
    q,  # [BLOCK_M, BLOCK_D]
    q2,  # [BLOCK_M, BLOCK_D2] (SPLIT only)
    k_tile,  # pointer to key n0 of the sequence, head dim 0 (a scalar)
    v_tile,  # the same of the values
    k_offs,  # [BLOCK_D, BLOCK_N] int32 offsets of the tile's keys (transposed) from k_tile
    v_offs,  # [BLOCK_N, BLOCK_D] int32 offsets of the tile's values from v_tile
    k_dim_ok,  # [BLOCK_D, 1] bool: the real head dims
    v_dim_ok,  # [1, BLOCK_D] bool
    k2_offs,  # [BLOCK_D2, BLOCK_N] offsets of the keys' head dims from BLOCK_D on (SPLIT only)
    v2_offs,  # [BLOCK_N, BLOCK_D2] the same of the values (SPLIT only)
    k2_dim_ok,  # [BLOCK_D2, 1] bool (SPLIT only)
    v2_dim_ok,  # [1, BLOCK_D2] bool (SPLIT only)
    key_mask_ptr,  # key 0 of the sequence (KEY_MASK only)
    n0,  # first key of the tile, relative to the sequence start
    seq_len,
    row_start,  # [BLOCK_M] int32: row i sees keys j >= row_start[i] (RANGE only)
    row_end,  # [BLOCK_M] int32: row i sees keys j < row_end[i] (masked tiles only)
    masked,  # bool scalar: apply row_end (and row_start): the diagonal, block-edge and last tiles
    qk_scale,
    masked_bias,
    RANGE: tl.constexpr,  # apply row_start too (MASK == KEY_RANGE; every tile is masked)
    KEY_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
):
    """One key tile of the online softmax: returns the updated (acc, acc2, l, m).

    Unmasked tiles lie inside the sequence and are seen whole by every row. Loads are masked to the
    sequence in every tile all the same (one predicate per 16-byte copy), so that both kinds of tile
    share one code path up to the uniform ``masked`` branch. The products are :func:`_dot.dot`: tensor
    cores for bf16/fp16 tiles, IEEE float32 (no TF32) for float32 ones, float32 copies under UPCAST_DOT
    (the interpreter).
    """
    keys = n0 + tl.arange(0, BLOCK_N)
    key_ok = keys < seq_len
    k_t = tl.load(k_tile + k_offs, mask=k_dim_ok & key_ok[None, :], other=0.0)
    scores = dot(q, k_t, UPCAST_DOT)
    if SPLIT:
        k2_t = tl.load(k_tile + k2_offs, mask=k2_dim_ok & key_ok[None, :], other=0.0)
        scores += dot(q2, k2_t, UPCAST_DOT)
    scores = scores * qk_scale
    if KEY_MASK != 0:
        keep = tl.load(key_mask_ptr + keys, mask=key_ok, other=0) != 0
        if KEY_MASK == 1:
            scores = tl.where(keep[None, :], scores, float("-inf"))
        else:
            scores = tl.where(keep[None, :], scores, scores + masked_bias)
    if masked:
        visible = keys[None, :] < row_end[:, None]
        if RANGE:
            visible = visible & (keys[None, :] >= row_start[:, None])
        scores = tl.where(visible, scores, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    # A row with no visible key so far keeps m = -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
    m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
    if KEY_MASK == 2:
        # Natural units: s + bias rounds as in the reference, and the difference to the max is taken
        # before the scaling to base 2. A row whose keys are all biased sits near the bias (-10000,
        # where float32 values are 1e-3 apart): scaling first would round every score there again.
        p = tl.exp2((scores - m_base[:, None]) * _LOG2E)
        alpha = tl.exp2((m_i - m_base) * _LOG2E)
    else:
        p = tl.exp2(scores - m_base[:, None])
        alpha = tl.exp2(m_i - m_base)
    l_i = l_i * alpha + tl.sum(p, axis=1)

    v = tl.load(v_tile + v_offs, mask=key_ok[:, None] & v_dim_ok, other=0.0)
    # P in the value dtype (rounded to nearest even), as flash attention feeds the tensor cores.
    if v.dtype != tl.float32:
        p = cast_rne(p, v.dtype, BF16_BY_BITS)
    acc = acc * alpha[:, None] + dot(p, v, UPCAST_DOT)
    if SPLIT:
        v2 = tl.load(v_tile + v2_offs, mask=key_ok[:, None] & v2_dim_ok, other=0.0)
        acc2 = acc2 * alpha[:, None] + dot(p, v2, UPCAST_DOT)
    return acc, acc2, l_i, m_new


@triton.jit
def _flash_attention_kernel(
    q_ptr,  # [T, H, HEAD_DIM]
    k_ptr,  # [T, Hkv, HEAD_DIM]
    v_ptr,  # [T, Hkv, HEAD_DIM]
    cu_seqlens_ptr,  # [num_seqs + 1] int32/int64
    key_end_ptr,  # [T] int32, relative to the sequence start (MASK == KEY_END or KEY_RANGE only)
    key_start_ptr,  # [T] int32, relative to the sequence start (MASK == KEY_RANGE only)
    key_mask_ptr,  # [T] bool (KEY_MASK only)
    out_ptr,  # [T, H, HEAD_DIM], output
    num_seqs,
    num_tiles,  # query tiles of the longest sequence
    num_heads,
    group_size,  # H / Hkv
    block_size,  # rows per block (MASK == BLOCK_CAUSAL only)
    qk_scale,  # scale * log2(e); scale when KEY_MASK == 2 (natural units)
    masked_bias,  # the key bias (KEY_MASK == 2 only)
    stride_q_t,
    stride_q_h,
    stride_q_d,
    stride_k_t,
    stride_k_h,
    stride_k_d,
    stride_v_t,
    stride_v_h,
    stride_v_d,
    stride_o_t,
    stride_o_h,
    stride_o_d,
    MASK: tl.constexpr,
    KEY_MASK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_D2: tl.constexpr,  # >= 16; the second column block of the head dims when SPLIT
    SPLIT: tl.constexpr,
    STRIDE_ALIGN: tl.constexpr,  # the token and head strides arrive divided by it
    UPCAST_DOT: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
):
    # The token and head strides arrive divided by STRIDE_ALIGN (see stride_alignment). Head strides such
    # as the ViT's 72 are not multiples of 16, which Triton cannot see from the value: it would assume any
    # alignment and load one element per instruction, with no async copies. Multiplying by the constexpr
    # proves every tile row starts on a STRIDE_ALIGN-element boundary: 16-byte vectors again.
    stride_q_t *= STRIDE_ALIGN
    stride_q_h *= STRIDE_ALIGN
    stride_k_t *= STRIDE_ALIGN
    stride_k_h *= STRIDE_ALIGN
    stride_v_t *= STRIDE_ALIGN
    stride_v_h *= STRIDE_ALIGN
    stride_o_t *= STRIDE_ALIGN
    stride_o_h *= STRIDE_ALIGN
    # One flat axis (CUDA's y/z grid axes stop at 65535): heads vary fastest, so the query heads of one
    # KV head run side by side and share its K/V in L2; the last query tiles (the most keys under a
    # causal mask) are launched first.
    pid = tl.program_id(0)
    head = pid % num_heads
    rest = pid // num_heads
    seq = rest % num_seqs
    tile = num_tiles - 1 - rest // num_seqs
    seq_start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    seq_len = (tl.load(cu_seqlens_ptr + seq + 1) - seq_start).to(tl.int32)
    m0 = tile * BLOCK_M
    if m0 >= seq_len:
        return

    kv_head = (head // group_size).to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)  # relative to the sequence start
    row_ok = rows < seq_len
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    local = tl.arange(0, BLOCK_M)
    q_tile = q_ptr + (seq_start + m0) * stride_q_t + head.to(tl.int64) * stride_q_h
    q = tl.load(
        q_tile + local[:, None] * stride_q_t + dims[None, :] * stride_q_d,
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    # Head dims BLOCK_D .. BLOCK_D + BLOCK_D2 (SPLIT): a second, narrower column block, so that e.g. the
    # ViT's 72 costs 64 + 16 columns of tensor-core work instead of a padded 128. Its pointers are the
    # first block's plus BLOCK_D head dims.
    dims2 = tl.arange(0, BLOCK_D2)
    dim2_ok = BLOCK_D + dims2 < HEAD_DIM
    if SPLIT:
        q2 = tl.load(
            q_tile + local[:, None] * stride_q_t + (BLOCK_D + dims2)[None, :] * stride_q_d,
            mask=row_ok[:, None] & dim2_ok[None, :],
            other=0.0,
        )
    else:
        q2 = tl.zeros([BLOCK_M, BLOCK_D2], q_ptr.dtype.element_ty)  # never read
    # K/V tiles: a scalar 64-bit pointer per tile (advanced by one tile per iteration: long packs never
    # overflow an int32 offset) plus loop-invariant int32 offsets inside the tile. Loop-carried tensors
    # of 64-bit pointers instead cost two registers per element and made hd 128 spill (sm_90a SASS).
    cols = tl.arange(0, BLOCK_N)
    k_tile = k_ptr + seq_start * stride_k_t + kv_head * stride_k_h
    v_tile = v_ptr + seq_start * stride_v_t + kv_head * stride_v_h
    k_offs = cols[None, :] * stride_k_t + dims[:, None] * stride_k_d
    v_offs = cols[:, None] * stride_v_t + dims[None, :] * stride_v_d
    k2_offs = cols[None, :] * stride_k_t + (BLOCK_D + dims2)[:, None] * stride_k_d
    v2_offs = cols[:, None] * stride_v_t + (BLOCK_D + dims2)[None, :] * stride_v_d
    k_dim_ok = dim_ok[:, None]
    v_dim_ok = dim_ok[None, :]
    k2_dim_ok = dim2_ok[:, None]
    v2_dim_ok = dim2_ok[None, :]
    key_mask_seq = key_mask_ptr + seq_start

    last_row = tl.minimum(m0 + BLOCK_M, seq_len) - 1
    if MASK == 0:  # BIDIRECTIONAL
        row_end = tl.zeros([BLOCK_M], tl.int32) + seq_len
        first_end = seq_len
        tile_end = seq_len
    elif MASK == 1:  # CAUSAL
        row_end = rows + 1
        first_end = m0 + 1
        tile_end = last_row + 1
    elif MASK == 4:  # BLOCK_CAUSAL: the end of each row's block, cut at the sequence end
        row_end = tl.minimum((rows // block_size + 1) * block_size, seq_len)
        first_end = tl.minimum((m0 // block_size + 1) * block_size, seq_len)
        tile_end = tl.minimum((last_row // block_size + 1) * block_size, seq_len)
    else:  # KEY_END, KEY_RANGE
        key_end_seq = key_end_ptr + seq_start
        row_end = tl.load(key_end_seq + rows, mask=row_ok, other=0)
        first_end = tl.load(key_end_seq + m0)
        tile_end = tl.load(key_end_seq + last_row)
    full_end = (first_end // BLOCK_N) * BLOCK_N  # key tiles every row of the tile sees entirely
    row_start = tl.zeros([BLOCK_M], tl.int32)
    full_start = 0
    # KEY_RANGE: no key tile is seen whole; start at the tile holding the first row's first key.
    if MASK == 3:
        key_start_seq = key_start_ptr + seq_start
        row_start = tl.load(key_start_seq + rows, mask=row_ok, other=0)
        full_end = (tl.load(key_start_seq + m0) // BLOCK_N) * BLOCK_N
        full_start = full_end  # every tile runs masked
        k_tile += full_end.to(tl.int64) * stride_k_t
        v_tile += full_end.to(tl.int64) * stride_v_t

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)  # loop-invariant (folded away) unless SPLIT
    k_step = BLOCK_N * stride_k_t
    v_step = BLOCK_N * stride_v_t
    # One loop, masked from full_end on (see the module docstring: two loops serialized the wgmmas).
    for n0 in range(full_start, tile_end, BLOCK_N):
        acc, acc2, l_i, m_i = _attend_key_tile(
            acc, l_i, m_i, acc2, q, q2, k_tile, v_tile, k_offs, v_offs, k_dim_ok, v_dim_ok,
            k2_offs, v2_offs, k2_dim_ok, v2_dim_ok, key_mask_seq, n0, seq_len, row_start, row_end,
            n0 >= full_end, qk_scale, masked_bias, MASK == 3, KEY_MASK, BLOCK_N, SPLIT, BLOCK_D2,
            UPCAST_DOT, BF16_BY_BITS,
        )  # fmt: skip
        k_tile += k_step
        v_tile += v_step

    norm = tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l = 0: no visible key, the row is zero
    out_dtype = out_ptr.dtype.element_ty
    o_tile = out_ptr + (seq_start + m0) * stride_o_t + head.to(tl.int64) * stride_o_h
    tl.store(
        o_tile + local[:, None] * stride_o_t + dims[None, :] * stride_o_d,
        cast_rne(acc / norm, out_dtype, BF16_BY_BITS),
        mask=row_ok[:, None] & dim_ok[None, :],
    )
    if SPLIT:
        tl.store(
            o_tile + local[:, None] * stride_o_t + (BLOCK_D + dims2)[None, :] * stride_o_d,
            cast_rne(acc2 / norm, out_dtype, BF16_BY_BITS),
            mask=row_ok[:, None] & dim2_ok[None, :],
        )


def _pack_key_ranges(
    cu_seqlens: torch.Tensor, tokens: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """key_start, key_end [T] int32 of a KEY_RANGE pack: token t of sequence s sees the keys from the
    start of s up to itself (causal) or to the end of s. On the device, no host read."""
    positions = torch.arange(tokens, device=cu_seqlens.device)
    bounds = cu_seqlens.long()
    seq = torch.searchsorted(bounds, positions, right=True) - 1  # empty sequences own no token
    key_start = bounds[seq]
    key_end = positions + 1 if causal else bounds[seq + 1]
    return key_start.to(torch.int32), key_end.to(torch.int32)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    key_end: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    out: torch.Tensor,
    *,
    max_seqlen: int,
    causal: bool,
    scale: float,
    masked_bias: float | None,
    block_size: int | None = None,
) -> None:
    """Fill ``out [T, H, d]`` with attention within each packed sequence (``kelix_fast.ops.attention``).

    q [T, H, d], k/v [T, Hkv, d] (any strides), cu_seqlens [n+1] int32/int64 on the same device,
    ``max_seqlen`` at least the longest sequence. Structure: ``key_end`` [T] int32 (row ``i`` sees the
    keys ``j < key_end[i]`` of its sequence, non-decreasing along each sequence), else ``block_size``
    (row ``i`` sees its own block of ``block_size`` rows and the earlier ones), else causal or
    bidirectional. ``key_mask`` [T] bool: False keys are excluded, or get ``masked_bias`` (already
    rounded to the input dtype) added to their scaled scores. Inputs are validated by the op; nothing
    here reads a tensor on the host.
    """
    tokens, heads, head_dim = q.shape
    num_seqs = cu_seqlens.shape[0] - 1
    if tokens == 0 or num_seqs == 0 or max_seqlen == 0:
        return
    assert head_dim <= MAX_HEAD_DIM, f"head dim {head_dim} > {MAX_HEAD_DIM}"
    interpreter = interpreted(_flash_attention_kernel)
    width, second = head_dim_blocks(head_dim)
    float32 = q.dtype == torch.float32
    key_start = None
    if key_end is not None:
        mask = KEY_END
    elif block_size is not None:
        mask = BLOCK_CAUSAL
        # Blocks longer than every sequence see their whole sequence, as one of max_seqlen rows does;
        # the clamp keeps (i // block_size + 1) * block_size below 2 * max_seqlen in int32.
        block_size = min(block_size, max_seqlen)
    elif num_seqs > 1 and max_seqlen <= PACK_MAX_SEQLEN:
        mask = KEY_RANGE
        key_start, key_end = _pack_key_ranges(cu_seqlens, tokens, causal)
        # One sequence, the whole pack (slices: no index tensor from the host, capture-safe).
        cu_seqlens = torch.cat([cu_seqlens[:1], cu_seqlens[-1:]])
        num_seqs, max_seqlen = 1, tokens
    else:
        mask = CAUSAL if causal else BIDIRECTIONAL
    if mask == KEY_RANGE and not interpreter:
        block_m, block_n, num_warps = _PACKED[float32]
    else:
        block_m, block_n, num_warps = blocks(float32, head_dim, max_seqlen, interpreter)
    num_tiles = triton.cdiv(max_seqlen, block_m)
    programs = num_tiles * num_seqs * heads
    assert programs < 2**31, f"grid of {programs} programs"
    align = stride_alignment(q, k, v, out)
    if key_mask is None:
        key_mode = _NO_KEY_MASK
    else:
        key_mode = _KEY_MASK_EXCLUDE if masked_bias is None else _KEY_MASK_BIAS
    _flash_attention_kernel[(programs,)](
        q,
        k,
        v,
        cu_seqlens,
        cu_seqlens if key_end is None else key_end,  # placeholder pointer, never read
        cu_seqlens if key_start is None else key_start,  # placeholder pointer, never read
        cu_seqlens if key_mask is None else key_mask,  # placeholder pointer, never read
        out,
        num_seqs,
        num_tiles,
        heads,
        heads // k.shape[1],
        1 if block_size is None else block_size,
        scale if key_mode == _KEY_MASK_BIAS else scale * _LOG2E.value,
        0.0 if masked_bias is None else masked_bias,
        *_scaled_strides(q, align),
        *_scaled_strides(k, align),
        *_scaled_strides(v, align),
        *_scaled_strides(out, align),
        MASK=mask,
        KEY_MASK=key_mode,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=width,
        BLOCK_D2=max(second, _MIN_DOT_DIM),
        SPLIT=second > 0,
        STRIDE_ALIGN=align,
        UPCAST_DOT=interpreter,
        BF16_BY_BITS=interpreter,
        num_warps=num_warps,
    )
