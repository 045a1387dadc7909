"""The reference Next-Block-Prediction loop (kelix-ar.md §5.5) and the official full-sequence forwards.

Generation: one prefill of every prompt (right-padded into one batch, each request at its own positions),
the Block Decoder on each request's last position only, then one LLM step per new block with the KV cache.
A request stops when a generated block (the first one included) has ``<|im_end|>`` in slot 0, or after
``max_new_blocks`` blocks; it gives the same result whatever shares its batch.

:func:`generate_reference` is driven from the host (logits materialised, a synchronisation per Block
Decoder step, ``torch.Generator`` draws): it runs the official ``_sample_group`` sampler and is the
specification the engine's loop (runtime/device_decoding.py) is tested against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kelix_fast.models.kelix_ar import KelixARModel
from kelix_fast.runtime.block_decoding import decode_blocks, run_chain
from kelix_fast.runtime.prefill import prefill
from kelix_fast.runtime.sampling import SamplingParams
from kelix_fast.runtime.timing import StageTimer


@dataclass
class GeneratedRequest:
    """One request: new_groups [n, G+1]; chains [n, G+1] (-1 = step not run); hidden [L + n - 1, D] or None."""

    new_groups: torch.Tensor
    chains: torch.Tensor
    hidden: torch.Tensor | None


def generate_reference(
    model: KelixARModel,
    prompts: Sequence[torch.Tensor],
    *,
    max_new_blocks: int,
    params: SamplingParams,
    sampler: str,
    generators: Sequence[torch.Generator | None],
    return_hidden_states: bool,
    timings: dict[str, float] | None = None,
    step_callback: Callable[[int], None] | None = None,
) -> list[GeneratedRequest]:
    """Generate up to ``max_new_blocks`` groups after each prompt (prompts: [L_b, G+1] int64, validated).

    ``timings``, when given, receives the seconds of the ``prefill`` (LLM + first block) and ``decode``;
    ``step_callback(n)`` is called after the n-th new group of the batch (progress reporting).
    """
    eos = model.config.llm.eos_token_id
    timer = StageTimer(timings, prompts[0].device)
    capacity = max(p.shape[0] for p in prompts) + max_new_blocks - 1
    h, _, cache, lengths = prefill(model, prompts, capacity, hidden_states=False)
    rows = torch.arange(len(prompts), device=h.device)
    last = h[rows, lengths - 1]
    hidden = [[h[b, : p.shape[0]]] if return_hidden_states else [] for b, p in enumerate(prompts)]
    new_groups: list[list[torch.Tensor]] = [[] for _ in prompts]
    chains: list[list[torch.Tensor]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=h.device)
    for step in range(max_new_blocks):
        groups, chain = decode_blocks(
            model, last, params=params, sampler=sampler, generators=generators
        )
        for b in torch.nonzero(~done).flatten().tolist():
            new_groups[b].append(groups[b])
            chains[b].append(chain[b])
        done |= groups[:, 0] == eos
        timer.lap("prefill" if step == 0 else "decode")
        if step_callback is not None:
            step_callback(step + 1)
        if bool(done.all()) or step == max_new_blocks - 1:
            break
        pos = lengths + step  # the new group's position in each request
        h, _ = model.llm(model.llm.embed(groups[:, None]), cache, pos, pos + 1)
        last = h[:, 0]
        if return_hidden_states:
            for b in torch.nonzero(~done).flatten().tolist():
                hidden[b].append(h[b])  # [1, D]
    return [
        GeneratedRequest(
            new_groups=torch.stack(new_groups[b]),
            chains=torch.stack(chains[b]),
            hidden=torch.cat(hidden[b]) if return_hidden_states else None,
        )
        for b in range(len(prompts))
    ]


def forward_teacher_forced(
    model: KelixARModel, groups: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The official teacher-forced forward: groups [B, L, G+1] -> (hidden states, logits [B, L, G+1, V]).

    The Block Decoder input of position i is ``[h_i, c_0, ..., c_{G-1}]`` with ``c_j`` the per-slot
    embeddings of group i+1, rolled so the last position wraps around to group 0 (golden README quirk 6).
    Hidden states: the embeddings, then every layer's output (the last before the final norm).
    """
    llm, batch, length = model.llm, groups.shape[0], groups.shape[1]
    _, states, _, _ = prefill(model, list(groups), length, hidden_states=True)
    slots = llm.slot_embeddings(groups).roll(-1, dims=1)  # [B, L, G, D]
    x = torch.cat([states[-1][:, :, None], slots], dim=2).flatten(0, 1)  # [B*L, G+1, D]
    y = model.block_decoder(x, model.block_decoder.new_cache(x.shape[0]), start=0)
    return states, llm.unembed(y).view(batch, length, x.shape[1], -1)


def forward_greedy_blocks(
    model: KelixARModel, groups: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The official forward with teacher forcing off: groups [B, L, G+1] -> (hidden states, [B, L, K, V]).

    Every position runs a greedy Block Decoder chain; all stop together when the LAST position of the batch
    emits end-of-block or after ``max_length - 1`` steps (golden README quirk 7), so K is shared.
    """
    q_eos, (batch, length) = model.config.llm.q_eos_token, groups.shape[:2]
    _, states, _, _ = prefill(model, list(groups), length, hidden_states=True)
    steps = run_chain(
        model,
        states[-1].flatten(0, 1),
        choose=lambda logits: logits.argmax(dim=-1),
        finished=lambda ids: bool(ids[-1] == q_eos),
    )
    return states, torch.stack(steps.logits, dim=1).view(batch, length, len(steps.logits), -1)
