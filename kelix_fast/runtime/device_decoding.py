"""Next-Block-Prediction generation that stays on the device (kelix-ar.md §5.5, §7.4).

One decode step = one LLM step on every request's previous block + the next block of every request: a
fixed ``max_length - 1`` Block Decoder steps with its KV cache, each scored and selected by
``ops.head_select`` (final norm + output head + selection fused, no logits in memory). A row whose block
has ended keeps running, restricted to ``q_eos`` (see runtime/block_selection.py), so the step has no
data-dependent control flow: nothing is read back to the host inside it, and on CUDA the whole step is
captured once as a CUDA graph and replayed (:class:`DecodeSteps`; :class:`DecodeStepsCache` keeps the
graph for later calls of the same batch/capacity bucket). The host checks whether every request has stopped only every
``check_every`` steps; a stopped request's later blocks are computed and dropped (its output is cut at its
first ``<|im_end|>`` group), so results never depend on the batch or on ``check_every``.

Greedy results equal the reference loop (runtime/generation.py) exactly; sampled draws use per-draw seeds
(:func:`~kelix_fast.runtime.block_selection.slot_seeds`) instead of a torch.Generator stream.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from kelix_fast import ops
from kelix_fast.models.kelix_ar import KelixARModel
from kelix_fast.models.kv_cache import KVCache
from kelix_fast.runtime.block_decoding import NOT_GENERATED, close_blocks
from kelix_fast.runtime.block_selection import SelectionPlan, slot_seeds
from kelix_fast.runtime.generation import RequestOutput, prefill
from kelix_fast.runtime.sampling import SamplingParams
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
            seeds=slot_seeds(request_seeds, block, t) if plan.samples else None,
        )
        chain[:, t] = ids.masked_fill(ended, NOT_GENERATED)
        ended = ended | (ids == q_eos)
        x = table[ids][:, None]
    return close_blocks(chain, q_eos), chain


class DecodeSteps:
    """The static tensors of the decode steps of one shape (batch, KV capacity, selection plan) and the
    step itself, run eagerly or, with ``cuda_graph``, captured once as a CUDA graph and replayed.

    The graph reads fixed addresses: the KV caches, the request seeds and the latest block of each
    request (``groups``, ``chain``, the ``hidden`` state it came from, its position ``pos`` and index
    ``block``). :meth:`start` refills them for a new call, so one capture serves every later call of the
    same shape (see :class:`DecodeStepsCache`).
    """

    def __init__(
        self,
        model: KelixARModel,
        batch: int,
        capacity: int,
        plan: SelectionPlan,
        *,
        cuda_graph: bool,
    ) -> None:
        llm, width = model.llm, model.config.llm.group_size
        device, dtype = llm.norm.scale.device, llm.norm.scale.dtype
        self.model, self.plan, self.capacity, self.cuda_graph = model, plan, capacity, cuda_graph
        self.cache = llm.new_cache(batch, capacity)
        self.block_cache = model.block_decoder.new_cache(batch)
        self.seeds = torch.zeros(batch, dtype=torch.int64, device=device)
        self.groups = torch.zeros(batch, width, dtype=torch.int64, device=device)
        self.chain = torch.zeros_like(self.groups)
        self.hidden = torch.zeros(batch, model.config.llm.embed_dim, dtype=dtype, device=device)
        self.pos = torch.zeros(batch, dtype=torch.int64, device=device)
        self.block = torch.zeros(1, dtype=torch.int64, device=device)
        self._graph: torch.cuda.CUDAGraph | None = None

    def start(
        self, prompts: Sequence[torch.Tensor], request_seeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill the prompts (exactly ``batch`` of them) and decode their first block (eager).

        Returns the prompts' last-layer states h [B, L_max, D] and lengths [B].
        """
        self.seeds.copy_(request_seeds)
        h, _, _, lengths = prefill(
            self.model, prompts, self.capacity, hidden_states=False, cache=self.cache
        )
        self.hidden.copy_(h[torch.arange(len(prompts), device=h.device), lengths - 1])
        self.pos.copy_(lengths - 1)
        self.block.zero_()
        self._decode()
        return h, lengths

    def advance(self) -> None:
        """One decode step: the LLM on every request's latest block, then the next block."""
        if not self.cuda_graph:
            self._step()
        elif self._graph is not None:
            self._graph.replay()
        else:
            # Warm up on a side stream (a real step: kernels compile, workspaces are allocated), then
            # capture; capture records without executing, so the state advances exactly once.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step()
            self._graph = graph

    def _step(self) -> None:
        llm = self.model.llm
        self.pos += 1
        self.block += 1
        h, _ = llm(llm.embed(self.groups[:, None]), self.cache, self.pos, self.pos + 1)
        self.hidden.copy_(h[:, 0])
        self._decode()

    def _decode(self) -> None:
        groups, chain = decode_block(
            self.model, self.hidden, self.block_cache, self.plan, self.seeds, self.block
        )
        self.groups.copy_(groups)
        self.chain.copy_(chain)


class DecodeStepsCache:
    """:class:`DecodeSteps` kept across generate calls, one per (batch bucket, capacity bucket, plan).

    Batches are padded to a power of two and KV capacities rounded up to a multiple of
    ``CAPACITY_STEP`` (within ``max_seq_len``), so calls of similar sizes replay the same captured graph.
    The least recently used entries beyond ``max_entries`` are dropped with their KV caches and graphs.
    """

    CAPACITY_STEP = 512

    def __init__(self, max_entries: int = 2) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(
                f"DecodeStepsCache: max_entries must be an int >= 1, got {max_entries!r}"
            )
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, DecodeSteps] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    @staticmethod
    def bucket(batch: int, capacity: int, max_seq_len: int) -> tuple[int, int]:
        """(padded batch, rounded capacity) for a call."""
        step = DecodeStepsCache.CAPACITY_STEP
        return 1 << (batch - 1).bit_length(), min(-(-capacity // step) * step, max_seq_len)

    def get(
        self,
        model: KelixARModel,
        batch: int,
        capacity: int,
        params: Sequence[SamplingParams],
        scoring: str,
        *,
        cuda_graph: bool,
    ) -> DecodeSteps:
        key = (batch, capacity, tuple(params), scoring, cuda_graph)
        steps = self._entries.pop(key, None)
        if steps is None:
            while len(self._entries) >= self.max_entries:
                self._entries.popitem(last=False)
            device = model.llm.norm.scale.device
            plan = SelectionPlan(model.config.llm, params, scoring=scoring, device=device)
            steps = DecodeSteps(model, batch, capacity, plan, cuda_graph=cuda_graph)
        self._entries[key] = steps
        return steps


def generate(
    model: KelixARModel,
    prompts: Sequence[torch.Tensor],
    *,
    max_new_blocks: int,
    params: Sequence[SamplingParams],
    scoring: str,
    request_seeds: Sequence[int],
    return_hidden_states: bool,
    cuda_graphs: bool,
    reuse: DecodeStepsCache | None = None,
    check_every: int = 8,
    timings: dict[str, float] | None = None,
    step_callback: Callable[[int], None] | None = None,
) -> list[RequestOutput]:
    """Generate up to ``max_new_blocks`` groups after each prompt (prompts: [L_b, G+1] int64, validated).

    ``params``, ``request_seeds`` (in [0, 2^31)): one per prompt. ``cuda_graphs`` (CUDA only) captures
    the decode step once and replays it. With ``reuse``, the batch is padded to its bucket (copies of
    the first request, dropped from the results) and the steps, graph included, come from and stay in
    that cache. ``timings`` receives ``prefill`` (LLM + first block) and ``decode`` seconds;
    ``step_callback(n)`` is called after the n-th new group of the batch is launched.
    """
    eos, device = model.config.llm.eos_token_id, prompts[0].device
    timer = StageTimer(timings, device)
    batch = len(prompts)
    capacity = max(p.shape[0] for p in prompts) + max_new_blocks - 1
    with torch.inference_mode(), ops.trusted_values():
        if reuse is None:
            plan = SelectionPlan(model.config.llm, params, scoring=scoring, device=device)
            steps = DecodeSteps(model, batch, capacity, plan, cuda_graph=cuda_graphs)
        else:
            padded, capacity = reuse.bucket(batch, capacity, model.config.llm.max_seq_len)
            extra = padded - batch
            prompts = [*prompts, *[prompts[0]] * extra]
            params = [*params, *[params[0]] * extra]
            request_seeds = [*request_seeds, *[request_seeds[0]] * extra]
            steps = reuse.get(model, padded, capacity, params, scoring, cuda_graph=cuda_graphs)
        seeds = torch.tensor(request_seeds, dtype=torch.int64, device=device)
        h, lengths = steps.start(prompts, seeds)
        out_groups = torch.empty(
            len(prompts), max_new_blocks, steps.groups.shape[1], dtype=torch.int64, device=device
        )
        out_chains = torch.empty_like(out_groups)
        out_hidden = None
        if return_hidden_states:
            out_hidden = torch.empty(
                len(prompts), max_new_blocks - 1, h.shape[-1], dtype=h.dtype, device=device
            )

        def record(n: int) -> None:
            out_groups[:, n] = steps.groups
            out_chains[:, n] = steps.chain
            if out_hidden is not None and n > 0:
                out_hidden[:, n - 1] = steps.hidden
            if step_callback is not None:
                step_callback(n + 1)

        record(0)
        timer.lap("prefill")
        done = 1
        while done < max_new_blocks:
            stops = out_groups[:batch, :done, 0] == eos
            if done % check_every == 0 and bool(stops.any(1).all()):
                break  # every request has stopped: one host read per check_every blocks
            steps.advance()
            record(done)
            done += 1
        timer.lap("decode")
    hidden = None if out_hidden is None else out_hidden[:batch]
    return _requests(
        h[:batch],
        lengths[:batch],
        out_groups[:batch, :done],
        out_chains[:batch, :done],
        hidden,
        eos,
    )


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
