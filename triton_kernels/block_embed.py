"""Group embedding of the Block Encoder (kelix-ar.md §4.4): one pass over the G+1 id slots per group.

A program owns BLOCK_ROWS groups x BLOCK_D features. Slots are visited left to right with a running
"no q_eos yet" flag, so the float32 sum has the reference's order and float32 results are bit-identical.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rounding import cast_rne, interpreted

# (BLOCK_ROWS groups, BLOCK_D features, num_warps). The op is gather-bound: on a GPU 4 x 512 keeps
# 16-byte loads and enough programs for decode (B rows, D = 4096 -> 8 feature tiles per row block).
# The interpreter runs one program's block as numpy calls at ~10 ms per slot, so it gets fewer, taller ones.
_BLOCKS = {"gpu": (4, 512, 4), "interpreter": (64, 512, 1)}


@triton.jit
def _block_embed_kernel(
    ids_ptr,  # [B, L, NUM_SLOTS] int64
    table_ptr,  # [V, D]
    out_ptr,  # [B, L, D], dtype of table, output
    n_rows,  # B * L
    seq_len,  # L
    dim,  # D
    q_eos,
    text_vocab,
    stride_ids_batch,
    stride_ids_pos,
    stride_ids_slot,
    stride_table_row,
    stride_table_dim,
    stride_out_batch,
    stride_out_pos,
    stride_out_dim,
    NUM_SLOTS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
):
    row_block = tl.program_id(0).to(tl.int64)
    dim_block = tl.program_id(1).to(tl.int64)
    rows = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    batch = rows // seq_len
    pos = rows % seq_len
    cols = dim_block * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < dim

    ids_row = ids_ptr + batch * stride_ids_batch + pos * stride_ids_pos
    first = tl.load(ids_row, mask=row_mask, other=q_eos)
    # A text group (slot 0 < text_vocab) reads the text id's row in every slot (official quirk).
    is_visual = first >= text_vocab
    valid = row_mask
    acc = tl.zeros((BLOCK_ROWS, BLOCK_D), tl.float32)
    # The last slot is the end-of-block slot: its embedding is zero, so it is never read.
    for slot in tl.static_range(NUM_SLOTS - 1):
        token = tl.load(ids_row + slot * stride_ids_slot, mask=row_mask, other=q_eos)
        valid = valid & (token != q_eos)  # only the prefix strictly before the first q_eos counts
        table_row = tl.where(is_visual, token, first)
        acc += tl.load(
            table_ptr + table_row[:, None] * stride_table_row + cols[None, :] * stride_table_dim,
            mask=valid[:, None] & col_mask[None, :],
            other=0.0,
        ).to(tl.float32)

    out = out_ptr + batch[:, None] * stride_out_batch + pos[:, None] * stride_out_pos
    tl.store(
        out + cols[None, :] * stride_out_dim,
        cast_rne(acc, out_ptr.dtype.element_ty, BF16_BY_BITS),  # summed in float32, rounded once
        mask=row_mask[:, None] & col_mask[None, :],
    )


def block_embed(
    ids: torch.Tensor, table: torch.Tensor, out: torch.Tensor, *, q_eos: int, text_vocab: int
) -> None:
    """Fill ``out [B, L, D]`` with the sum of ``table [V, D]`` rows of each group ``ids [B, L, G+1]``.

    Inputs are validated by ``kelix_fast.ops.block_embed`` (ids in [0, V), at least 2 slots); this
    launcher only sizes the grid.
    """
    batch, seq_len, num_slots = ids.shape
    n_rows, dim = batch * seq_len, table.shape[1]
    if n_rows == 0 or dim == 0:
        return
    by_bits = interpreted(_block_embed_kernel)
    block_rows, block_d, num_warps = _BLOCKS["interpreter" if by_bits else "gpu"]
    grid = (triton.cdiv(n_rows, block_rows), triton.cdiv(dim, block_d))
    _block_embed_kernel[grid](
        ids,
        table,
        out,
        n_rows,
        seq_len,
        dim,
        q_eos,
        text_vocab,
        ids.stride(0),
        ids.stride(1),
        ids.stride(2),
        table.stride(0),
        table.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        NUM_SLOTS=num_slots,
        BLOCK_ROWS=block_rows,
        BLOCK_D=block_d,
        BF16_BY_BITS=by_bits,  # see _rounding
        num_warps=num_warps,
    )
