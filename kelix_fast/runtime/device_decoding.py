"""Next-Block-Prediction generation that stays on the device (kelix-ar.md §5.5, §7.4).

One decode step = one LLM step on every request's previous block + the next block of every request: a
fixed ``max_length - 1`` Block Decoder steps with its KV cache, each scored and selected by
``ops.head_select`` (final norm + output head + selection fused, no logits in memory). A row whose block
has ended keeps running, restricted to ``q_eos`` (see runtime/block_selection.py), so the step has no
data-dependent control flow: nothing is read back to the host inside it, and on CUDA the whole step is
captured once as a CUDA graph and replayed. The host checks whether every request has stopped only every
``check_every`` steps; a stopped request's later blocks are computed and dropped (its output is cut at its
first ``<|im_end|>`` group), so results never depend on the batch or on ``check_every``.

Greedy results equal the reference loop (runtime/generation.py) exactly; sampled draws use per-draw seeds
(:func:`~kelix_fast.runtime.block_selection.slot_seeds`) instead of a torch.Generator stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kelix_fast import ops
from kelix_fast.models.kelix_ar import KelixARModel
from kelix_fast.models.kv_cache import KVCache
from kelix_fast.runtime.block_decoding import NOT_GENERATED, close_blocks
from kelix_fast.runtime.block_selection import SelectionPlan, slot_seeds
from kelix_fast.runtime.generation import RequestOutput, prefill
from kelix_fast.runtime.timing import StageTimer


def decode_block(
    model: KelixARModel,
    hidden: torch.Tensor,
    cache: KVCache,
    plan: SelectionPlan,
    request_seeds: torch.Tensor,
    block: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next block of every row from LLM hidden states [n, D]: groups [n, G+1] and the chain [n, G+1].

    ``cache`` is the Block Decoder cache ([*, n, max_length, ...], overwritten); ``request_seeds`` [n]
    and ``block`` ([1] or [n] int64) seed the draws. The chain holds the id chosen at each step, and
    ``NOT_GENERATED`` (-1) after the row's end-of-block, as the reference loop's.
    """
    llm, decoder = model.llm, model.block_decoder
    q_eos, n = plan.q_eos, hidden.shape[0]
    table = llm.tok_embeddings.embed_tokens.weight
    chain = torch.full(
        (n, model.config.llm.group_size), NOT_GENERATED, dtype=torch.int64, device=hidden.device
    )
    ended = torch.zeros(n, dtype=torch.bool, device=hidden.device)
    x = hidden[:, None]
    for t in range(decoder.config.max_length - 1):
        y = decoder(x, cache, start=t)[:, 0]
        ids = plan.select(
            y,
            llm.norm.scale,
            llm.output.weight,
            eps=llm.norm.eps,
            allowed=plan.allowed(t, chain[:, 0], ended),
            seeds=slot_seeds(request_seeds, block, t),
        )
        chain[:, t] = ids.masked_fill(ended, NOT_GENERATED)
        ended = ended | (ids == q_eos)
        x = table[ids][:, None]
    return close_blocks(chain, q_eos), chain


@dataclass
class _State:
    """The static tensors a decode step reads and writes (fixed addresses: a CUDA graph replays them)."""

    groups: torch.Tensor  # [B, G+1] the latest block of each request
    chain: torch.Tensor  # [B, G+1] its Block Decoder chain
    hidden: torch.Tensor  # [B, D] the LLM output the latest block was decoded from
    pos: torch.Tensor  # [B] int64, LLM position of the latest block
    block: torch.Tensor  # [1] int64, index of the latest block among the new ones


def generate(
    model: KelixARModel,
    prompts: Sequence[torch.Tensor],
    *,
    max_new_blocks: int,
    plan: SelectionPlan,
    request_seeds: torch.Tensor,
    return_hidden_states: bool,
    cuda_graphs: bool,
    check_every: int = 8,
    timings: dict[str, float] | None = None,
    step_callback: Callable[[int], None] | None = None,
) -> list[RequestOutput]:
    """Generate up to ``max_new_blocks`` groups after each prompt (prompts: [L_b, G+1] int64, validated).

    ``request_seeds``: [B] int64 in [0, 2^31) on the model's device. ``cuda_graphs`` (CUDA only) captures
    the decode step once and replays it. ``timings`` receives ``prefill`` (LLM + first block) and
    ``decode`` seconds; ``step_callback(n)`` is called after the n-th new group of the batch is launched.
    """
    llm, eos = model.llm, model.config.llm.eos_token_id
    device = prompts[0].device
    timer = StageTimer(timings, device)
    batch, width = len(prompts), model.config.llm.group_size
    capacity = max(p.shape[0] for p in prompts) + max_new_blocks - 1
    out_groups = torch.empty(batch, max_new_blocks, width, dtype=torch.int64, device=device)
    out_chains = torch.empty_like(out_groups)
    out_hidden = None
    with torch.inference_mode(), ops.trusted_values():
        h, _, cache, lengths = prefill(model, prompts, capacity, hidden_states=False)
        rows = torch.arange(batch, device=device)
        block_cache = model.block_decoder.new_cache(batch)
        block = torch.zeros(1, dtype=torch.int64, device=device)
        hidden = h[rows, lengths - 1]
        groups, chain = decode_block(model, hidden, block_cache, plan, request_seeds, block)
        state = _State(groups, chain, hidden, lengths - 1, block)
        if return_hidden_states:
            out_hidden = torch.empty(
                batch, max_new_blocks - 1, h.shape[-1], dtype=h.dtype, device=device
            )

        def step() -> None:
            state.pos += 1
            state.block += 1
            h, _ = llm(llm.embed(state.groups[:, None]), cache, state.pos, state.pos + 1)
            state.hidden.copy_(h[:, 0])
            groups, chain = decode_block(
                model, state.hidden, block_cache, plan, request_seeds, state.block
            )
            state.groups.copy_(groups)
            state.chain.copy_(chain)

        def record(n: int) -> None:
            out_groups[:, n] = state.groups
            out_chains[:, n] = state.chain
            if out_hidden is not None and n > 0:
                out_hidden[:, n - 1] = state.hidden
            if step_callback is not None:
                step_callback(n + 1)

        record(0)
        timer.lap("prefill")
        run = _graphed(step) if cuda_graphs and max_new_blocks > 1 else step
        steps = 1
        while steps < max_new_blocks:
            if steps % check_every == 0 and bool((out_groups[:, :steps, 0] == eos).any(1).all()):
                break  # every request has stopped: one host read per check_every blocks
            run()
            record(steps)
            steps += 1
        timer.lap("decode")
    return _requests(h, lengths, out_groups[:, :steps], out_chains[:, :steps], out_hidden, eos)


def _graphed(step: Callable[[], None]) -> Callable[[], None]:
    """Run ``step`` once (the warm-up, on a side stream), capture it, and return the graph's replay.

    The warm-up is a real step; capture records without executing, so the state advances once.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    pending = [True]  # the warm-up already produced the first replayed step's results

    def replay() -> None:
        if pending:
            pending.clear()
            return
        graph.replay()

    return replay


def _requests(h, lengths, groups, chains, hidden, eos) -> list[RequestOutput]:
    """Cut each request after its first ``<|im_end|>`` group and collect its outputs (host side)."""
    stops = groups[:, :, 0] == eos
    steps = groups.shape[1]
    first = torch.where(stops.any(1), stops.int().argmax(1) + 1, steps).tolist()
    return [
        RequestOutput(
            new_groups=groups[b, :n],
            chains=chains[b, :n],
            hidden=(
                torch.cat([h[b, : int(lengths[b])], hidden[b, : n - 1]])
                if hidden is not None
                else None
            ),
        )
        for b, n in enumerate(first)
    ]
