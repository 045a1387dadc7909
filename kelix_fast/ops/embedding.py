"""``block_embed``: one LLM input embedding per group of 9 ids (the Block Encoder, kelix-ar.md §4.4)."""

from __future__ import annotations

import torch

from kelix_fast import triton_kernels
from kelix_fast.ops import _checks, _cuda, _dispatch

_OP = "block_embed"


def block_embed(
    ids: torch.Tensor, table: torch.Tensor, *, q_eos: int, text_vocab: int, backend: str = "auto"
) -> torch.Tensor:
    """Group embedding: ``out[b, l] = sum_{j < first q_eos} E[row_j]`` over the first G slots.

    ``row_j = ids[b, l, j]`` for a visual group (slot 0 >= ``text_vocab``); for a text group every slot reads
    the text id's row ``ids[b, l, 0]``, so a text group with k leading non-q_eos ids gives ``k * E[t]`` and a
    group starting with q_eos gives zeros (official quirks, golden README 5). The last slot never counts.

    Args:
        ids: [B, L, G+1] int64 (G+1 = 9), ids in [0, V).
        table: [V, D] float, V, D >= 1, the embedding table (``tok_embeddings.embed_tokens``).
        q_eos: the end-of-block id. text_vocab: first visual id. Both ints >= 0.
        backend: ``"auto" | "cuda" | "triton" | "torch"``. ``"auto"`` picks cuda (kelix_fast._C built),
            then triton, for CUDA tensors, and torch otherwise; triton on CPU tensors runs only when
            asked for by name, under Triton's interpreter (a test path). Both sum the slots left to
            right in float32.

    Returns:
        [B, L, D] in the dtype of ``table``; summed in float32 and rounded once.
    """
    _checks.tensor(_OP, "ids", ids)
    _checks.tensor(_OP, "table", table)
    _checks.shape(_OP, "table", table, (None, None), "V, D")
    _checks.no_empty_dim(_OP, "table", table, "V, D")
    _checks.shape(_OP, "ids", ids, (None, None, None), "B, L, G+1")
    _checks.dtype(_OP, "ids", ids, (torch.int64,))
    if ids.shape[-1] < 2:
        raise ValueError(
            f"{_OP}: ids must have at least 2 slots per group, got shape {list(ids.shape)}"
        )
    _checks.same_device(_OP, ids=ids, table=table)
    q_eos = _checks.non_negative_int(_OP, "q_eos", q_eos)
    text_vocab = _checks.non_negative_int(_OP, "text_vocab", text_vocab)
    _checks.ids_in_range(_OP, "ids", ids, 0, table.shape[0])
    out = torch.empty(*ids.shape[:2], table.shape[1], dtype=table.dtype, device=table.device)
    _dispatch.pick(_OP, _IMPLS, backend, ids, table).run(ids, table, out, q_eos, text_vocab)
    return out


def _reference(ids, table, out, q_eos, text_vocab) -> None:
    slots = ids[..., :-1]  # [B, L, G]: the end-of-block slot has a zero embedding
    is_visual = slots[..., :1] >= text_vocab
    rows = torch.where(is_visual, slots, slots[..., :1])
    valid = torch.cumprod(slots != q_eos, dim=-1)  # the prefix strictly before the first q_eos
    acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    for j in range(slots.shape[-1]):
        acc += valid[..., j, None] * table[rows[..., j]].float()
    out.copy_(acc)


def _triton(ids, table, out, q_eos, text_vocab) -> None:
    kernels = triton_kernels.kernels_for("block_embed", table)
    kernels.block_embed(ids, table, out, q_eos=q_eos, text_vocab=text_vocab)


_IMPLS = {
    "cuda": _dispatch.Impl(_cuda.block_embed, can_run=_cuda.can_run_block_embed),
    "triton": _dispatch.Impl(
        _triton, can_run=_dispatch.needs_triton, auto_can_run=_dispatch.on_cuda
    ),
    "torch": _dispatch.Impl(_reference, can_run=_dispatch.always),
}
