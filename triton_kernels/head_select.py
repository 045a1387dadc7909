"""Final RMSNorm + output head + selection (kelix-ar.md §4.6, §5.6, §8 #3) without an [M, V] logits matrix.

Three steps, each small except the second:

1. ``_head_select_norm_kernel`` (one program per row) writes the RMSNorm'd rows ``normed [M, D]`` in the
   head's dtype to a scratch buffer (M x D, a few KB). A separate pre-pass keeps the scoring loop a plain
   ``tl.dot`` over D chunks instead of re-normalising every chunk for every vocabulary tile.
2. ``_head_select_scores_kernel``, grid (row blocks, vocabulary splits): each program streams its split of
   the head through ``tl.dot`` in [BLOCK_V, BLOCK_D] tiles and keeps per-row *keys*: an int64 that packs
   a float32 score (order-preserving bits, high half) and ``INDEX_MAX - id`` (low half), so that the
   largest key is the largest score with the lowest id on ties: one integer max or sort is the exact
   tie rule of the reference. ``KEEP == 1`` keeps the running max (greedy; or Gumbel-max sampling, where
   the score is ``logit / (t + 1e-5) + Gumbel(seed, id)``); ``KEEP > 1`` keeps the running top-KEEP keys
   (unordered): while a tile still holds a key above the smallest kept one, the tile's largest key
   replaces it. Keys arrive in descending order, so at most min(KEEP, keys above the starting minimum)
   replacements per tile, and none once the kept set is good, which after a few tiles is the rule
   (``tl.sort`` would cost a bitonic network per tile, and seconds per tile under the interpreter).
3. The merge runs in torch on the [M, splits, KEEP] keys (at most a few hundred KB): max over splits, or
   the global top-k, the temperature-scaled top-p rule and a Gumbel-max draw over the kept candidates.
   The candidates are tiny, so a third kernel would save one or two small launches only.

Sampling uses Gumbel-max with a counter-based hash of (row seed, vocabulary id): exact for the categorical
distribution up to the resolution of the uniforms (23 bits in the kernel, 32 bits in the merge), and a
row's draw depends only on its seed and its scores, never on the grid or the split count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dot import tie_exact_dot
from ._rounding import interpreted, round_to

# The most candidates a program keeps per row (top_k <= MAX_KEEP for the candidate mode).
MAX_KEEP = 64
_INDEX_MAX = tl.constexpr(2147483647)  # low half of a key is _INDEX_MAX - id (ids < 2^31)
# Key of a padded lane: below every real key, -inf scores included.
_SENTINEL = tl.constexpr(-(2**63))
_KEY_MAX = tl.constexpr(2**63 - 1)
# lowbias32 multipliers (both below 2^31, so the torch twin never overflows int64).
_MIX_A = 0x21F0AAAD
_MIX_B = 0x735A2D97
_SEED_SALT = 0x9E3779B9
_TARGET_PROGRAMS = 528  # ~4 programs per SM on H100/H200 (132 SMs): enough splits to fill the GPU
# (BLOCK_M_MAX, BLOCK_V, BLOCK_D, num_warps) per mode on a GPU; BLOCK_M is the row count rounded up to a
# power of two (at least 16, the minimum M of tl.dot) and capped at BLOCK_M_MAX. The candidate mode holds
# [BLOCK_M, KEEP] int64 keys in registers next to the tile, hence its smaller row and vocabulary blocks:
# with 128-id tiles it spilled on sm_90a (bf16: 528 B of stack per thread at 32 rows, 104 B at 16),
# with 64-id tiles it does not (255 and 254 registers).
_BLOCKS = {"max": (64, 128, 64, 8), "candidates": (32, 64, 64, 8)}
# Under the interpreter every (program x loop iteration) costs milliseconds: one split, wide tiles.
_INTERPRETER_BLOCKS = (64, 256, 64, 4)
_NORM_BLOCK_D = 1024
_NORM_ROWS_INTERPRETER = 256  # rows per norm program under the interpreter (one on a GPU)


@triton.jit
def _mix32(x):
    """lowbias32 hash of a uint32 tensor (wrapping multiplies)."""
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    x = x ^ (x >> 15)
    return x


@triton.jit
def _head_select_norm_kernel(
    y_ptr,  # [n_rows, dim], row stride stride_y_row, last dim contiguous
    w_ptr,  # [dim]
    normed_ptr,  # [n_rows, dim] contiguous, output (the head's dtype)
    dim,
    eps,
    n_rows,
    stride_y_row,
    stride_w,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
):
    row_block = tl.program_id(0).to(tl.int64)
    rows = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    out_dtype = normed_ptr.dtype.element_ty
    sumsq = tl.zeros((BLOCK_ROWS, BLOCK_D), tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (dims < dim)[None, :]
        y = tl.load(y_ptr + rows[:, None] * stride_y_row + dims[None, :], mask=mask, other=0.0)
        y = y.to(tl.float32)
        sumsq += y * y
    # ops.rms_norm: x * rsqrt(mean(x^2) + eps) in float32, cast, then times the weight in
    # the input dtype (one more rounding). 1 / sqrt_rn is the correctly rounded pair torch's CPU uses.
    rstd = 1.0 / tl.sqrt_rn(tl.sum(sumsq, axis=1) / dim + eps)
    for d0 in range(0, dim, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (dims < dim)[None, :]
        y = tl.load(y_ptr + rows[:, None] * stride_y_row + dims[None, :], mask=mask, other=0.0)
        w = tl.load(w_ptr + dims * stride_w, mask=dims < dim, other=0.0).to(tl.float32)
        normed = round_to(y.to(tl.float32) * rstd[:, None], out_dtype, BF16_BY_BITS)
        normed = round_to(normed * w[None, :], out_dtype, BF16_BY_BITS)
        tl.store(normed_ptr + rows[:, None] * dim + dims[None, :], normed.to(out_dtype), mask=mask)


@triton.jit
def _head_select_scores_kernel(
    normed_ptr,  # [n_rows, dim] contiguous, the head's dtype
    head_ptr,  # [vocab, dim], row stride stride_head_row, last dim contiguous
    ranges_ptr,  # [n_rows, NUM_RANGES, 2] int64 half-open allowed id ranges (NUM_RANGES > 0 only)
    row_keys_ptr,  # [n_rows] int64 in [0, 2^32): hashed seeds (GUMBEL only)
    keys_ptr,  # [n_rows, num_splits, KEEP] int64, output
    n_rows,
    vocab,
    dim,
    split_size,  # a multiple of BLOCK_V
    temperature_div,  # logits are divided by it when SCALE
    stride_head_row,
    stride_ranges_row,
    stride_ranges_range,
    stride_keys_row,
    stride_keys_split,
    NUM_RANGES: tl.constexpr,
    KEEP: tl.constexpr,
    KEEP_POW2: tl.constexpr,
    GUMBEL: tl.constexpr,
    SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    row_block = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    split_start = split * split_size
    split_end = tl.minimum(split_start + split_size, vocab)
    if GUMBEL:
        row_keys = tl.load(row_keys_ptr + rows, mask=row_mask, other=0).to(tl.uint32)

    if KEEP == 1:
        best = tl.full((BLOCK_M,), _SENTINEL, tl.int64)
    else:
        slots = tl.arange(0, KEEP_POW2)
        # Empty slots hold distinct sentinels (SENTINEL + slot, still below every real key), so that the
        # minimum is one slot; padding slots hold the largest key and are never the minimum.
        empty = tl.zeros((BLOCK_M, KEEP_POW2), tl.int64) + (slots[None, :].to(tl.int64) + _SENTINEL)
        best = tl.where((slots < KEEP)[None, :], empty, _KEY_MAX)

    for v0 in range(split_start, split_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < split_end
        lanes = row_mask[:, None] & col_mask[None, :]
        if NUM_RANGES > 0:
            inside = tl.zeros((BLOCK_M, BLOCK_V), tl.int1)
            for r in tl.static_range(NUM_RANGES):
                range_ptr = ranges_ptr + rows * stride_ranges_row + r * stride_ranges_range
                low = tl.load(range_ptr, mask=row_mask, other=0)
                high = tl.load(range_ptr + 1, mask=row_mask, other=0)
                inside = inside | (
                    (cols[None, :] >= low[:, None]) & (cols[None, :] < high[:, None])
                )
            allowed = lanes & inside
        else:
            allowed = lanes

        # A tile no row may pick is never read: with sub-codebook ranges (scoring="structured") only the
        # slice and the q_eos row are streamed (kelix-ar.md §7.2), the rest costs no bandwidth.
        acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
        if tl.max(allowed.to(tl.int32)) > 0:
            for d0 in range(0, dim, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                dim_mask = dims < dim
                normed = tl.load(
                    normed_ptr + rows[:, None] * dim + dims[None, :],
                    mask=row_mask[:, None] & dim_mask[None, :],
                    other=0.0,
                )
                # Loaded transposed ([BLOCK_D, BLOCK_V]) to be the right operand of the dot.
                head_t = tl.load(
                    head_ptr + cols[None, :] * stride_head_row + dims[:, None],
                    mask=dim_mask[:, None] & col_mask[None, :],
                    other=0.0,
                )
                acc += tie_exact_dot(normed, head_t, UPCAST_DOT)

        scores = acc
        if SCALE:
            scores = tl.div_rn(
                scores, temperature_div
            )  # the reference's float32 division, bit for bit
        if GUMBEL:
            hashed = _mix32(row_keys[:, None] ^ _mix32(cols[None, :].to(tl.uint32)))
            # 23 bits: (2^23 - 1) + 0.5 is exact in float32, so the uniform stays below 1 (with 24
            # bits the top hash value's sum rounds up to 2^24, U = 1 and that id's score to +inf).
            uniform = ((hashed >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
            scores = scores - tl.log(-tl.log(uniform))
        scores = tl.where(allowed, scores, float("-inf"))
        scores = tl.where(scores == 0.0, 0.0, scores)  # -0.0 == 0.0 for argmax: one key for both

        # Order-preserving int32 of the float bits, then the id: max key = max score, lowest id.
        bits = scores.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        keys = (ordered.to(tl.int64) << 32) | (_INDEX_MAX - cols[None, :].to(tl.int64))
        keys = tl.where(lanes, keys, _SENTINEL)
        if KEEP == 1:
            best = tl.maximum(best, tl.max(keys, axis=1))
        else:
            floor = tl.min(best, axis=1)
            above = tl.max(tl.sum((keys > floor[:, None]).to(tl.int32), axis=1))
            for _ in range(tl.minimum(above, KEEP)):
                floor = tl.min(best, axis=1)
                top = tl.max(keys, axis=1)
                better = top > floor
                # Keys and empty slots are unique, so == picks exactly one slot and one lane.
                best = tl.where(better[:, None] & (best == floor[:, None]), top[:, None], best)
                keys = tl.where(keys == top[:, None], _SENTINEL, keys)

    out = keys_ptr + rows * stride_keys_row + split * stride_keys_split
    if KEEP == 1:
        tl.store(out, best, mask=row_mask)
    else:
        tl.store(
            out[:, None] + slots[None, :],
            best,
            mask=row_mask[:, None] & (slots < KEEP)[None, :],
        )


def _mix32_torch(x: torch.Tensor) -> torch.Tensor:
    """``_mix32`` on int64 tensors holding uint32 values (products stay below 2^63)."""
    mask = 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * _MIX_A) & mask
    x = x ^ (x >> 15)
    x = (x * _MIX_B) & mask
    return x ^ (x >> 15)


def row_keys(seeds: torch.Tensor) -> torch.Tensor:
    """int64 seeds [M] -> per-row hash keys [M] in [0, 2^32) (both halves of the seed count)."""
    high = _mix32_torch(((seeds >> 32) & 0xFFFFFFFF) ^ _SEED_SALT)
    return _mix32_torch((seeds & 0xFFFFFFFF) ^ high)


def decode_ids(keys: torch.Tensor) -> torch.Tensor:
    return _INDEX_MAX.value - (keys & 0xFFFFFFFF)


def decode_scores(keys: torch.Tensor) -> torch.Tensor:
    """float32 scores of keys (-inf for padded lanes)."""
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32).masked_fill(ordered == -(2**31), float("-inf"))  # sentinels


def _merge_candidates(
    keys: torch.Tensor, row_key: torch.Tensor, keep: int, top_p: float
) -> torch.Tensor:
    """Candidate keys [M, C] (temperature-scaled scores) -> drawn ids [M]: global top-``keep`` in
    (score desc, id asc) order, the stricter top-p rule of runtime/sampling.py, one Gumbel-max draw."""
    top = torch.sort(keys, dim=-1, descending=True).values[:, :keep]
    scores, ids = decode_scores(top), decode_ids(top)
    if top_p < 1.0:
        drop = torch.softmax(scores, dim=-1).cumsum(-1) > top_p
        drop[:, 0] = False  # the most likely token always survives
        scores = scores.masked_fill(drop, float("-inf"))
    hashed = _mix32_torch(row_key[:, None] ^ _mix32_torch(ids))
    uniform = (hashed.double() + 0.5) / 2.0**32
    choice = (scores.double() - torch.log(-torch.log(uniform))).argmax(-1, keepdim=True)
    return ids.gather(-1, choice).squeeze(-1)


def plan(vocab: int, top_k: int, top_p: float) -> tuple[int, bool]:
    """(KEEP, GUMBEL) for a request: greedy, Gumbel-max over the full row, or top-KEEP candidates.

    Raises ValueError when the candidate mode would need more than MAX_KEEP candidates per row.
    """
    if top_k == 1:
        return 1, False
    keep = (
        top_k if 0 < top_k < vocab else vocab
    )  # top_k = 0 or >= V filters nothing (runtime/sampling)
    if keep == vocab and top_p == 1.0:
        return 1, True
    if keep > MAX_KEEP:
        raise ValueError(
            f"top_p < 1 or a top-k filter needs at most {MAX_KEEP} candidates per row "
            f"(0 < top_k <= {MAX_KEEP}, or V <= {MAX_KEEP}), got top_k={top_k}, V={vocab}"
        )
    return keep, False


def head_select(
    y: torch.Tensor,
    norm_weight: torch.Tensor,
    head: torch.Tensor,
    ranges: torch.Tensor | None,
    seeds: torch.Tensor | None,
    ids: torch.Tensor,
    *,
    eps: float,
    temperature: float,
    top_k: int,
    top_p: float,
) -> None:
    """Fill ``ids [M]`` with the selected vocabulary id of each row (``kelix_fast.ops.head_select``).

    y [M, D] (last dim contiguous), norm_weight [D], head [V, D] (last dim contiguous), ranges
    [M, R, 2] int64 or None, seeds [M] int64 (sampling only). Inputs are validated by the op; this
    launcher allocates only its scratch (normed rows and the [M, splits, KEEP] keys), sizes the grid and
    merges the candidates.
    """
    n_rows, dim = y.shape
    vocab = head.shape[0]
    if n_rows == 0:
        return
    assert y.stride(-1) == 1 and head.stride(-1) == 1, "y and head need a contiguous last dim"
    keep, gumbel = plan(vocab, top_k, top_p)
    sampling = top_k != 1
    assert not sampling or seeds is not None, "sampling needs seeds"
    interpreter = interpreted(_head_select_scores_kernel)

    normed = torch.empty(n_rows, dim, dtype=head.dtype, device=y.device)
    norm_rows = _NORM_ROWS_INTERPRETER if interpreter else 1
    _head_select_norm_kernel[(triton.cdiv(n_rows, norm_rows),)](
        y,
        norm_weight,
        normed,
        dim,
        eps,
        n_rows,
        y.stride(0),
        norm_weight.stride(0),
        BLOCK_ROWS=norm_rows,
        BLOCK_D=min(_NORM_BLOCK_D, triton.next_power_of_2(dim)),
        BF16_BY_BITS=interpreter,
    )

    if interpreter:
        block_m_max, block_v, block_d, num_warps = _INTERPRETER_BLOCKS
    else:
        block_m_max, block_v, block_d, num_warps = _BLOCKS["max" if keep == 1 else "candidates"]
    block_m = min(block_m_max, max(16, triton.next_power_of_2(n_rows)))
    block_d = min(block_d, max(16, triton.next_power_of_2(dim)))
    row_blocks = triton.cdiv(n_rows, block_m)
    tiles = triton.cdiv(vocab, block_v)
    wanted_splits = 1 if interpreter else max(1, _TARGET_PROGRAMS // row_blocks)
    split_size = triton.cdiv(tiles, min(tiles, wanted_splits)) * block_v
    num_splits = triton.cdiv(vocab, split_size)

    keys = torch.empty(n_rows, num_splits, keep, dtype=torch.int64, device=y.device)
    row_key = row_keys(seeds) if sampling else keys  # keys: a placeholder pointer never read
    num_ranges = 0 if ranges is None else ranges.shape[1]
    range_arg = keys if ranges is None else ranges  # placeholder pointer when there are no ranges
    _head_select_scores_kernel[(row_blocks, num_splits)](
        normed,
        head,
        range_arg,
        row_key,
        keys,
        n_rows,
        vocab,
        dim,
        split_size,
        temperature + 1e-5,
        head.stride(0),
        range_arg.stride(0),
        range_arg.stride(1),
        keys.stride(0),
        keys.stride(1),
        NUM_RANGES=num_ranges,
        KEEP=keep,
        KEEP_POW2=triton.next_power_of_2(keep),
        GUMBEL=gumbel,
        SCALE=sampling and temperature > 0,
        BLOCK_M=block_m,
        BLOCK_V=block_v,
        BLOCK_D=block_d,
        UPCAST_DOT=interpreter,
        num_warps=num_warps,
    )
    if keep == 1:
        ids.copy_(decode_ids(keys[:, :, 0].amax(dim=-1)))
    else:
        ids.copy_(_merge_candidates(keys.view(n_rows, -1), row_key, keep, top_p))
