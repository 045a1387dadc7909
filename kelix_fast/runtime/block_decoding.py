"""Decoding one block per row with the Block Decoder and its KV cache (kelix-ar.md §5.4, §5.6).

A block costs at most ``max_length - 1`` incremental steps (8): row 0 is the LLM hidden state, each later row
the embedding of the id chosen at the previous step. Every step is scored by the LLM's final norm and full
output head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kelix_fast.models.kelix_ar import KelixARModel
from kelix_fast.runtime.sampling import SamplingParams, select

NOT_GENERATED = -1


@dataclass
class BlockSteps:
    """The chain of one Block Decoder run over n rows: ``ids[t]``, ``logits[t]`` ([n], [n, V]) per step."""

    ids: list[torch.Tensor]
    logits: list[torch.Tensor]


def run_chain(
    model: KelixARModel,
    hidden: torch.Tensor,
    choose: Callable[[torch.Tensor], torch.Tensor],
    finished: Callable[[torch.Tensor], bool],
) -> BlockSteps:
    """Run the Block Decoder from hidden [n, D] until ``finished(ids)`` or the step cap.

    ``choose(logits [n, V]) -> ids [n]`` picks the id that conditions the next step; each chosen id is
    embedded as the plain table row ``E[id]`` (no text/visual distinction inside a block).
    """
    decoder, llm = model.block_decoder, model.llm
    cache = decoder.new_cache(hidden.shape[0])
    table = llm.tok_embeddings.embed_tokens.weight
    steps = BlockSteps([], [])
    x = hidden[:, None]
    for t in range(decoder.config.max_length - 1):
        logits = llm.unembed(decoder(x, cache, start=t)[:, 0])
        ids = choose(logits)
        steps.ids.append(ids)
        steps.logits.append(logits)
        if finished(ids):
            break
        x = table[ids][:, None]
    return steps


def decode_blocks(
    model: KelixARModel,
    hidden: torch.Tensor,
    *,
    params: SamplingParams,
    sampler: str,
    generators: Sequence[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next block of every row: groups [n, G+1] and the Block Decoder's own chain [n, G+1] (-1 = none).

    ``sampler="sequential"``: each slot is sampled and conditions the next; a block ends at its sampled
    end-of-block. ``sampler="reference"``: the chain is greedy (argmax) whatever the parameters, and each
    slot is then drawn independently from its row's filtered logits; slots the chain never reached draw from
    a constant row (uniform over the filtered ids), as the official padding does. Both then force the last
    slot to end-of-block and fill every slot after the first end-of-block with it. With ``top_k=1`` both
    are greedy and identical.
    """
    q_eos = model.config.llm.q_eos_token
    n, width = hidden.shape[0], model.config.llm.group_size
    ended = torch.zeros(n, dtype=torch.bool, device=hidden.device)
    drawn: list[torch.Tensor] = []

    def draw(logits: torch.Tensor) -> torch.Tensor:
        # Only rows whose block is still open consume their generator: a request draws the same numbers
        # whatever else shares its batch.
        ids = torch.full((n,), NOT_GENERATED, dtype=torch.int64, device=logits.device)
        rows = torch.nonzero(~ended).flatten().tolist()
        ids[rows] = select(logits[rows], params, [generators[r] for r in rows])
        return ids

    def choose(logits: torch.Tensor) -> torch.Tensor:
        if sampler == "sequential":
            return draw(logits).masked_fill(ended, q_eos)
        drawn.append(draw(logits))
        return logits.argmax(dim=-1)

    def finished(ids: torch.Tensor) -> bool:
        ended.logical_or_(ids == q_eos)  # each row ends at its own end-of-block
        return bool(ended.all())

    steps = run_chain(model, hidden, choose, finished)
    chain = torch.full((n, width), NOT_GENERATED, dtype=torch.int64, device=hidden.device)
    chain[:, : len(steps.ids)] = torch.stack(steps.ids, dim=1)
    eob_before = torch.cumsum(chain == q_eos, dim=1) - (chain == q_eos).long()
    # Steps that ran after a row's own end-of-block (other rows were still open) are not part of its chain.
    chain = chain.masked_fill(eob_before > 0, NOT_GENERATED)

    if sampler == "sequential":
        groups = chain
    else:
        groups = torch.full((n, width), NOT_GENERATED, dtype=torch.int64, device=hidden.device)
        groups[:, : len(drawn)] = torch.stack(drawn, dim=1)
        groups = groups.masked_fill(chain == NOT_GENERATED, NOT_GENERATED)
        constant_row = torch.zeros(1, model.config.llm.total_vocab, device=hidden.device)
        for row in range(n):
            for t in torch.nonzero(groups[row, :-1] == NOT_GENERATED).flatten().tolist():
                groups[row, t] = select(constant_row, params, [generators[row]])[0]
    return close_blocks(groups, q_eos), chain


def close_blocks(groups: torch.Tensor, q_eos: int) -> torch.Tensor:
    """Sampled slots [n, G+1] (-1 where none) -> blocks: the last slot and every slot from the first
    end-of-block on set to ``q_eos`` (kelix-ar.md §5.6)."""
    groups = groups.clone()
    groups[:, -1] = q_eos
    after_eob = torch.cumsum(groups == q_eos, dim=1) > 0
    return groups.masked_fill(after_eob, q_eos)
