"""Next-Block-Prediction decoding that stays on the device (kelix-ar.md §5.5, §7.4): the decode slots.

One decode step = one LLM step on every running request's latest block + the next block of each: a
fixed ``max_length - 1`` Block Decoder steps with its KV cache, each scored and selected by
``ops.head_select`` (final norm + output head + selection fused, no logits in memory). A row whose block
has ended keeps running, restricted to ``q_eos`` (runtime/block_selection.py), so a step has no
data-dependent control flow: nothing is read back to the host inside it, and on CUDA it is captured
once per shape as a CUDA graph and replayed.

:class:`DecodeSlots` holds ``max_batch`` request slots with their KV caches and the latest block of each.
Requests are admitted into free slots (prefill + first block, eager) while the others are mid-generation,
and a step runs the rows ``[0, bucket)`` (``bucket``: the power of two that covers the highest occupied
slot), so one captured graph serves every mix of requests of that bucket and sampling parameters. A free
row inside the bucket is computed and ignored; it never advances its position, and admission overwrites
it whole. Each row's work depends on that row alone, so a request's output never depends on what shares
the slots. The scheduler is runtime/engine_core.py.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from kelix_fast import ops
from kelix_fast.models.kelix_ar import KelixARModel
from kelix_fast.models.kv_cache import KVCache
from kelix_fast.runtime.block_decoding import NOT_GENERATED, close_blocks
from kelix_fast.runtime.block_selection import SelectionPlan, slot_seeds
from kelix_fast.runtime.graphs import capture_graph
from kelix_fast.runtime.prefill import prefill


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
    and ``block`` ([1] or [n] int64, each row's new-block index) seed the draws. The chain holds the id
    chosen at each step, and ``NOT_GENERATED`` (-1) after the row's end-of-block, as the reference loop's.
    Each step: one Block Decoder step, :meth:`BlockChain.selection`, one head pass
    (:meth:`SelectionPlan.select`), :meth:`BlockChain.append`.
    """
    llm, decoder = model.llm, model.block_decoder
    table = llm.tok_embeddings.embed_tokens.weight
    chain = BlockChain(hidden.shape[0], model.config.llm.group_size, hidden.device)
    x = hidden[:, None]
    for t in range(decoder.config.max_length - 1):
        y = decoder(x, cache, start=t)[:, 0]
        allowed, seeds = chain.selection(plan, t, request_seeds, block)
        ids = plan.select(
            y, llm.norm.scale, llm.output.weight, eps=llm.norm.eps, allowed=allowed, seeds=seeds
        )
        x = chain.append(t, ids, plan.q_eos, table)
    return close_blocks(chain.ids, plan.q_eos), chain.ids


class BlockChain:
    """The ids one :func:`decode_block` call has chosen so far, and the glue of its steps around the
    Block Decoder step and the head pass: ``ids`` [n, G+1] int64 (``NOT_GENERATED`` after a row's
    end-of-block, and for the slots not reached yet), ``ended`` [n] bool."""

    def __init__(self, n: int, width: int, device: torch.device) -> None:
        self.ids = torch.full((n, width), NOT_GENERATED, dtype=torch.int64, device=device)
        self.ended = torch.zeros(n, dtype=torch.bool, device=device)

    def selection(
        self, plan: SelectionPlan, slot: int, request_seeds: torch.Tensor, block: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Slot ``slot``'s allowed ranges [n, 2, 2] and seeds [n] (None when no row samples)."""
        allowed = plan.allowed(slot, self.ids[:, 0], self.ended)
        return allowed, slot_seeds(request_seeds, block, slot) if plan.samples else None

    def append(self, slot: int, ids: torch.Tensor, q_eos: int, table: torch.Tensor) -> torch.Tensor:
        """Record slot ``slot``'s picks ids [n]; the next Block Decoder input E[ids]: [n, 1, D]."""
        self.ids[:, slot] = ids.masked_fill(self.ended, NOT_GENERATED)
        self.ended |= ids == q_eos
        return table[ids][:, None]


class DecodeSlots:
    """``max_batch`` request slots: their KV caches (``capacity`` positions each) and latest blocks.

    Per row: ``groups``/``chain`` [G+1] (the latest block and its Block Decoder chain), ``hidden`` [D] (the
    LLM state it came from), ``pos`` (its position), ``block`` (its new-block index), ``seeds`` (the
    request's seed) and ``active``. :meth:`admit` fills rows for new requests; :meth:`advance` runs a
    decode step over rows ``[0, bucket)``, eagerly or, with ``cuda_graphs``, as a CUDA graph captured
    once per (bucket, selection) and kept (the ``max_graphs`` latest).
    """

    def __init__(
        self,
        model: KelixARModel,
        max_batch: int,
        capacity: int,
        *,
        cuda_graphs: bool,
        max_graphs: int = 4,
    ) -> None:
        llm, width = model.llm, model.config.llm.group_size
        device, dtype = llm.norm.scale.device, llm.norm.scale.dtype
        self.model, self.max_batch, self.capacity = model, max_batch, capacity
        self.cuda_graphs, self.max_graphs = cuda_graphs, max_graphs
        self.cache = llm.new_cache(max_batch, capacity)
        self.block_cache = model.block_decoder.new_cache(max_batch)
        self.seeds = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.groups = torch.zeros(max_batch, width, dtype=torch.int64, device=device)
        self.chain = torch.zeros_like(self.groups)
        self.hidden = torch.zeros(max_batch, model.config.llm.embed_dim, dtype=dtype, device=device)
        self.pos = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.block = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.active = torch.zeros(max_batch, dtype=torch.int64, device=device)  # 1 = running
        # (bucket, selection key) -> (plan, graph or None when eager); least recently used first.
        self._steps: OrderedDict[tuple, tuple[SelectionPlan, torch.cuda.CUDAGraph | None]] = (
            OrderedDict()
        )

    @property
    def device(self) -> torch.device:
        return self.groups.device

    def admit(
        self,
        rows: Sequence[int],
        prompts: Sequence[torch.Tensor],
        request_seeds: Sequence[int],
        plan: SelectionPlan,
    ) -> torch.Tensor:
        """Prefill ``prompts`` ([L_i, G+1] int64) into free ``rows`` and decode their first block (eager).

        ``plan`` selects for these rows, in order. Returns the prompts' last-layer states [n, L_max, D]
        (request i valid in ``[:L_i]``); the new rows' first blocks are in :attr:`groups`/:attr:`chain`.
        """
        n, lengths = len(rows), [p.shape[0] for p in prompts]
        longest = max(lengths)
        with ops.trusted_values():
            h, _, cache, lengths_t = prefill(self.model, prompts, longest, hidden_states=False)
            for i, (row, length) in enumerate(zip(rows, lengths)):
                self.cache.copy_prefix(row, cache, i, length)
            index = torch.tensor(list(rows), dtype=torch.int64, device=self.device)
            hidden = h[torch.arange(n, device=self.device), lengths_t - 1]
            seeds = torch.tensor(list(request_seeds), dtype=torch.int64, device=self.device)
            block = torch.zeros(n, dtype=torch.int64, device=self.device)
            block_cache = self.model.block_decoder.new_cache(n)
            groups, chain = decode_block(self.model, hidden, block_cache, plan, seeds, block)
        self.groups[index], self.chain[index], self.hidden[index] = groups, chain, hidden
        self.pos[index], self.block[index] = lengths_t - 1, block
        self.seeds[index], self.active[index] = seeds, 1
        return h

    def release(self, row: int) -> None:
        """Free ``row``: it stops advancing (its contents stay until the next admission overwrites them)."""
        self.active[row] = 0

    def advance(self, bucket: int, plan_key: tuple, make_plan, *, capturable: bool = True) -> None:
        """One decode step of rows ``[0, bucket)``: the LLM on each running row's latest block, then the
        next block. ``make_plan()`` builds the :class:`SelectionPlan` of these rows the first time
        ``(bucket, plan_key)`` is seen; the step (graph) is kept for later calls of the same key.
        ``capturable=False`` (a selection that reads the host) runs the step eagerly even with
        ``cuda_graphs``."""
        key = (bucket, plan_key)
        entry = self._steps.pop(key, None)
        if entry is None:
            while len(self._steps) >= self.max_graphs:
                self._steps.popitem(last=False)
            entry = (make_plan(), None)
        plan, graph = entry
        with ops.trusted_values():
            if not (self.cuda_graphs and capturable):
                self._step(bucket, plan)
            elif graph is not None:
                graph.replay()
            else:  # the warm-up is a real step: the state advances once
                graph = capture_graph(lambda: self._step(bucket, plan))
        self._steps[key] = (plan, graph)

    def clear_graphs(self) -> None:
        """Drop the kept steps and their CUDA graphs (rebuilt on demand)."""
        self._steps.clear()

    def llm_step(self, bucket: int) -> None:
        """The LLM part of a decode step over rows ``[0, bucket)``: each running row's position and
        block index advance, and the LLM on its latest block leaves its state in :attr:`hidden`."""
        llm, active = self.model.llm, self.active[:bucket]
        pos, block = self.pos[:bucket], self.block[:bucket]
        # A free row keeps its position (so it never writes past its cache) and is otherwise ignored.
        pos += active
        block += active
        h, _ = llm(llm.embed(self.groups[:bucket, None]), self.cache.rows(bucket), pos, pos + 1)
        self.hidden[:bucket] = h[:, 0]

    def _step(self, bucket: int, plan: SelectionPlan) -> None:
        self.llm_step(bucket)
        groups, chain = decode_block(
            self.model,
            self.hidden[:bucket],
            self.block_cache.rows(bucket),
            plan,
            self.seeds[:bucket],
            self.block[:bucket],
        )
        self.groups[:bucket] = groups
        self.chain[:bucket] = chain
