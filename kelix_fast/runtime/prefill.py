"""Prefill: the prompts of a batch through the LLM in one pass, filling a KV cache (kelix-ar.md §5.5).

Shared by the engine's decode slots (runtime/device_decoding.py), the reference loop and the official
full-sequence forwards (runtime/generation.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kelix_fast.models.kelix_ar import KelixARModel
from kelix_fast.models.kv_cache import KVCache


def prefill(
    model: KelixARModel,
    prompts: Sequence[torch.Tensor],
    capacity: int,
    *,
    hidden_states: bool,
    cache: KVCache | None = None,
):
    """Right-pad the prompts [L_b, G+1] into one batch and run the LLM over them, filling ``cache`` (a
    new one of ``capacity`` positions when None; else one of that capacity and batch, overwritten)."""
    llm = model.llm
    lengths = torch.tensor([p.shape[0] for p in prompts], device=prompts[0].device)
    batch = torch.full(
        (len(prompts), int(lengths.max()), prompts[0].shape[1]),
        model.config.llm.q_eos_token,  # padding groups embed to zero and are never attended to
        dtype=torch.int64,
        device=prompts[0].device,
    )
    for b, p in enumerate(prompts):
        batch[b, : p.shape[0]] = p
    if cache is None:
        cache = llm.new_cache(len(prompts), capacity)
    h, states = llm(
        llm.embed(batch),
        cache,
        torch.zeros_like(lengths),
        lengths,
        output_hidden_states=hidden_states,
        fresh=True,  # every prompt starts at position 0 in an empty (or overwritten) cache
    )
    return h, states, cache, lengths
