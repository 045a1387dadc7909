"""The step-level engine core: requests, a FIFO of waiting ones, and continuous batching over decode slots.

:class:`EngineCore` owns :class:`~kelix_fast.runtime.device_decoding.DecodeSlots`. Each :meth:`EngineCore.step`
first advances every running request (one decode step over the slots, or ``num_blocks`` of them), reads
the new blocks back once, finishes the requests that produced ``<|im_end|>`` or reached their block
budget and frees their slots at once, then admits waiting requests into the free slots in arrival order
(prefill + first block). Requests join and leave between steps; each one's output equals what it gives
alone, because every row of a step depends on that row alone and every draw is seeded by (request seed,
block, slot).

Requests reaching this layer are validated (runtime/requests.py does it for the user-facing layer).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from kelix_fast.models.kelix_ar import KelixARModel
from kelix_fast.runtime.block_selection import SelectionPlan, host_bound_reason
from kelix_fast.runtime.device_decoding import DecodeSlots
from kelix_fast.runtime.generation import GeneratedRequest
from kelix_fast.runtime.sampling import SamplingParams
from kelix_fast.runtime.timing import StageTimer

FINISH_REASONS = ("eos", "length", "aborted")


class StepFailed(RuntimeError):
    """A step raised (e.g. out of device memory): the requests it was running or admitting are dropped
    and their slots freed, so the core goes on serving the others; ``request_ids`` names them and the
    original exception is the cause."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"the step failed for {len(request_ids)} request(s): {cause!r}")
        self.request_ids = request_ids


@dataclass
class Request:
    """One validated generation request.

    ``prompt``: [L, G+1] int64 groups on the model's device (images already tokenized and placed);
    ``seed`` in [0, 2^31); ``max_new_blocks`` >= 1 with ``L + max_new_blocks - 1`` within the slots'
    capacity.
    """

    request_id: str
    prompt: torch.Tensor
    params: SamplingParams
    seed: int
    max_new_blocks: int
    scoring: str = "full"
    return_hidden_states: bool = False
    slot: int | None = field(default=None, init=False)
    generated: int = field(default=0, init=False)


@dataclass
class RequestOutput:
    """What one step did for one request.

    Attributes:
        request_id: the request's id.
        new_groups: [n, G+1] int64, the groups generated in this step (n = 0 for an aborted request).
        block_decoder_ids: [n, G+1] int64, the Block Decoder chain behind each new group (-1 = step not
            run).
        hidden_states: [m, D] or None (asked for at ``add_request``): last-layer LLM states of the
            positions fed in this step: the prompt's L positions in the request's first step, then one
            per fed group. Concatenated over the steps they are ``generate``'s ``hidden_states``.
        finished: whether the request is done; ``finish_reason`` is then ``"eos"`` (a group with
            ``<|im_end|>`` in slot 0, included in ``new_groups``), ``"length"`` (``max_new_blocks``
            reached) or ``"aborted"``, else None.
    """

    request_id: str
    new_groups: torch.Tensor
    block_decoder_ids: torch.Tensor
    hidden_states: torch.Tensor | None
    finished: bool
    finish_reason: str | None


@dataclass(frozen=True)
class EngineStats:
    """running/waiting request counts; KV positions reserved by running requests out of the slots'."""

    running: int
    waiting: int
    max_batch: int
    kv_positions_used: int
    kv_positions_total: int

    @property
    def kv_usage(self) -> float:
        return self.kv_positions_used / self.kv_positions_total


class EngineCore:
    """Continuous batching of :class:`Request` over ``max_batch`` decode slots of ``capacity`` positions."""

    def __init__(
        self, model: KelixARModel, *, max_batch: int, capacity: int, cuda_graphs: bool
    ) -> None:
        self.model = model
        self.slots = DecodeSlots(model, max_batch, capacity, cuda_graphs=cuda_graphs)
        self._waiting: deque[Request] = deque()
        self._running: dict[int, Request] = {}  # slot -> request
        self._aborted: list[RequestOutput] = []
        self._admitting: list[Request] = []  # popped from the queue by the step in progress
        self._ids = itertools.count()

    @property
    def max_batch(self) -> int:
        return self.slots.max_batch

    @property
    def capacity(self) -> int:
        return self.slots.capacity

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def requests(self) -> Iterator[Request]:
        """Every request not finished yet: the running ones by slot, then the waiting ones in order."""
        yield from (self._running[slot] for slot in sorted(self._running))
        yield from self._waiting

    def add(self, request: Request) -> None:
        """Queue a validated request (admitted by a later :meth:`step`, in arrival order)."""
        self._waiting.append(request)

    def abort(self, request_id: str) -> None:
        """Stop a request now: its slot (and KV cache rows) are free for the next admission; the next
        :meth:`step` reports it with ``finish_reason="aborted"``. Raises KeyError for an unknown id."""
        for slot, request in self._running.items():
            if request.request_id == request_id:
                del self._running[slot]
                self.slots.release(slot)
                break
        else:
            request = next((r for r in self._waiting if r.request_id == request_id), None)
            if request is None:
                raise KeyError(f"abort: no unfinished request with request_id {request_id!r}")
            self._waiting.remove(request)
        empty = torch.empty(0, request.prompt.shape[1], dtype=torch.int64)
        self._aborted.append(RequestOutput(request_id, empty, empty, None, True, "aborted"))

    def has_unfinished(self) -> bool:
        return bool(self._running or self._waiting or self._aborted)

    def stats(self) -> EngineStats:
        used = sum(r.prompt.shape[0] + r.max_new_blocks - 1 for r in self._running.values())
        return EngineStats(
            running=len(self._running),
            waiting=len(self._waiting),
            max_batch=self.max_batch,
            kv_positions_used=used,
            kv_positions_total=self.max_batch * self.capacity,
        )

    def step(self, num_blocks: int = 1) -> list[RequestOutput]:
        """Advance every running request by up to ``num_blocks`` blocks, then admit waiting requests.

        The running requests take ``min(num_blocks, fewest blocks any of them has left)`` decode steps
        with one host read at the end; a request that stops inside that window has its later blocks
        computed and dropped. Admitted requests get their first block. Returns one output per request
        that changed (aborted ones included); ``[]`` when nothing is queued or running.
        """
        outputs, self._aborted = self._aborted, []
        self._admitting = []
        try:
            if self._running:
                outputs += self._advance(num_blocks)
            if self._waiting and len(self._running) < self.max_batch:
                outputs += self._admit()
        except Exception as error:
            raise self._fail_step(error) from error
        return outputs

    # ------------------------------------------------------------------ internals

    def _advance(self, num_blocks: int) -> list[RequestOutput]:
        slots = self.slots
        bucket = min(self.max_batch, 1 << max(self._running).bit_length())
        rows = [self._running.get(row) for row in range(bucket)]
        # A free row selects like the first running one, so it adds no head_select launch.
        first = next(r for r in rows if r is not None)
        selection = (
            tuple((r or first).params for r in rows),
            tuple((r or first).scoring for r in rows),
        )
        window = min(num_blocks, *(r.max_new_blocks - r.generated for r in self._running.values()))
        groups, chains, hidden = [], [], []
        # A selection that reads the host (head_select's torch path) cannot be captured: such a step
        # runs eagerly, and the steps of the other mixes stay graphs.
        vocab = self.model.config.llm.total_vocab
        capturable = host_bound_reason(selection[0], vocab) is None
        for _ in range(window):
            slots.advance(bucket, selection, lambda: self._plan(*selection), capturable=capturable)
            groups.append(slots.groups[:bucket].clone())
            chains.append(slots.chain[:bucket].clone())
            hidden.append(slots.hidden[:bucket].clone())
        new = torch.stack(groups, 1).cpu()  # [bucket, window, G+1]: the step's one host read
        chains_t, hidden_t = torch.stack(chains, 1), torch.stack(hidden, 1)
        outputs = []
        for row, request in enumerate(rows):
            if request is None:
                continue
            count, reason = self._consume(request, new[row])
            outputs.append(
                RequestOutput(
                    request.request_id,
                    new[row, :count],
                    chains_t[row, :count].cpu(),
                    hidden_t[row, :count] if request.return_hidden_states else None,
                    reason is not None,
                    reason,
                )
            )
            if reason is not None:
                del self._running[row]
                slots.release(row)
        return outputs

    def _admit(self) -> list[RequestOutput]:
        free = [row for row in range(self.max_batch) if row not in self._running]
        admitted = [self._waiting.popleft() for _ in range(min(len(free), len(self._waiting)))]
        self._admitting = admitted
        rows = free[: len(admitted)]
        plan = self._plan(tuple(r.params for r in admitted), tuple(r.scoring for r in admitted))
        h = self.slots.admit(rows, [r.prompt for r in admitted], [r.seed for r in admitted], plan)
        index = torch.tensor(rows, device=self.slots.device)
        first = self.slots.groups[index].cpu()
        chains = self.slots.chain[index].cpu()
        outputs = []
        for i, (row, request) in enumerate(zip(rows, admitted)):
            request.slot = row
            _, reason = self._consume(request, first[i : i + 1])
            hidden = h[i, : request.prompt.shape[0]] if request.return_hidden_states else None
            outputs.append(
                RequestOutput(
                    request.request_id,
                    first[i : i + 1],
                    chains[i : i + 1],
                    hidden,
                    reason is not None,
                    reason,
                )
            )
            if reason is None:
                self._running[row] = request
            else:
                self.slots.release(row)
        return outputs

    def _fail_step(self, error: Exception) -> StepFailed:
        """Drop every request the failed step held (running, or being admitted) and free their slots."""
        failed = [
            *self._running.values(),
            *(r for r in self._admitting if r.slot not in self._running),
        ]
        for request in failed:
            if request.slot is not None:
                self.slots.release(request.slot)
        self._running.clear()
        self._admitting = []
        return StepFailed([r.request_id for r in failed], error)

    def _consume(self, request: Request, groups: torch.Tensor) -> tuple[int, str | None]:
        """How many of the new ``groups`` [n, G+1] (host) the request keeps, and why it finished if it
        did: up to and including its first ``<|im_end|>`` group, within its block budget."""
        eos = self.model.config.llm.eos_token_id
        budget = request.max_new_blocks - request.generated
        count = min(groups.shape[0], budget)
        stops = (groups[:count, 0] == eos).nonzero()
        if stops.numel():
            count = int(stops[0]) + 1
        request.generated += count
        if stops.numel():
            return count, "eos"
        return count, "length" if request.generated == request.max_new_blocks else None

    def _plan(self, params: tuple[SamplingParams, ...], scorings: tuple[str, ...]) -> SelectionPlan:
        device = self.slots.device
        return SelectionPlan(self.model.config.llm, params, scoring=scorings, device=device)


def generate(
    core: EngineCore,
    requests: list[Request],
    *,
    check_every: int = 8,
    timings: dict[str, float] | None = None,
    step_callback: Callable[[int], None] | None = None,
) -> list[GeneratedRequest]:
    """Run ``requests`` to completion on an idle ``core`` (the static batch of ``KelixAR.generate``).

    Every request is admitted in the first step (``core.max_batch >= len(requests)``), prefilled together
    and given its first block; then the core advances ``check_every`` blocks between host reads. Returns
    each request's new groups, chains and (if asked) hidden states, in order. ``timings`` receives the
    ``prefill`` (LLM + first block) and ``decode`` seconds; ``step_callback(n)`` is called after the
    n-th new group of the batch.
    """
    if core.has_unfinished():
        raise RuntimeError("generate needs an idle engine core (no request queued or running)")
    if len(requests) > core.max_batch:
        raise ValueError(f"{len(requests)} requests exceed the core's max_batch = {core.max_batch}")
    timer = StageTimer(timings, core.slots.device)
    outputs: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
    for request in requests:
        core.add(request)
    done, longest = 0, max(r.max_new_blocks for r in requests)
    with torch.inference_mode():
        while core.has_unfinished():
            for output in core.step(num_blocks=check_every if done else 1):
                outputs[output.request_id].append(output)
            # Blocks launched so far for the batch: the first step's one, then the windows.
            window = 1 if not done else min(check_every, longest - done)
            timer.lap("prefill" if not done else "decode")
            for n in range(done + 1, done + window + 1):
                if step_callback is not None:
                    step_callback(n)
            done += window
    return [_collect(outputs[r.request_id]) for r in requests]


def _collect(outputs: list[RequestOutput]) -> GeneratedRequest:
    hidden = [o.hidden_states for o in outputs]
    return GeneratedRequest(
        new_groups=torch.cat([o.new_groups for o in outputs]),
        chains=torch.cat([o.block_decoder_ids for o in outputs]),
        hidden=None if hidden[0] is None else torch.cat(hidden),
    )


def generate_batch(
    model: KelixARModel,
    prompts: Sequence[torch.Tensor],
    *,
    max_new_blocks: int,
    params: Sequence[SamplingParams],
    request_seeds: Sequence[int],
    scoring: str = "full",
    return_hidden_states: bool = False,
    cuda_graphs: bool = False,
    check_every: int = 8,
    timings: dict[str, float] | None = None,
) -> list[GeneratedRequest]:
    """:func:`generate` on a fresh core of exactly this batch and capacity (benchmarks, tests): validated
    prompts [L_b, G+1] with one ``params`` and seed each."""
    capacity = max(p.shape[0] for p in prompts) + max_new_blocks - 1
    core = EngineCore(model, max_batch=len(prompts), capacity=capacity, cuda_graphs=cuda_graphs)
    batch = [
        Request(core.new_request_id(), p, q, s, max_new_blocks, scoring, return_hidden_states)
        for p, q, s in zip(prompts, params, request_seeds)
    ]
    return generate(core, batch, check_every=check_every, timings=timings)
