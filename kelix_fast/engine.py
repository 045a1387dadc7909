"""``kelix_fast.Engine``: the step-level engine a server stands on (continuous batching of AR requests).

A loop of ``add_request`` / ``step`` / ``abort``, after vLLM's ``LLMEngine``::

    engine = Engine(ar, max_batch=32, max_context=2048)
    engine.add_request(prompt_ids, max_new_blocks=64, request_id="a")
    while engine.has_unfinished():
        for out in engine.step():  # every running request advances one block
            ...  # out.request_id, out.new_groups [n, 9], out.finished, out.finish_reason

Requests join between steps while others are mid-generation, and a finished or aborted request frees its
slot and KV cache rows at once; requests that do not fit wait in a FIFO queue. Each request's groups equal
what ``KelixAR.generate`` gives for it alone (greedy or seeded sampling), whatever joins or leaves around
it (runtime/engine_core.py says why). ``KelixAR.generate`` runs on the same core.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kelix_fast.ar import KelixAR
from kelix_fast.arguments import check_bool
from kelix_fast.runtime import engine_core, requests
from kelix_fast.runtime.block_selection import host_bound_reason
from kelix_fast.runtime.engine_core import EngineStats, RequestOutput, StepFailed
from kelix_fast.runtime.sampling import SamplingParams

__all__ = ["Engine", "EngineStats", "RequestOutput", "StepFailed"]


class Engine:
    """Continuous batching of :class:`KelixAR` generation requests over ``max_batch`` decode slots.

    Args:
        ar: the loaded AR engine (its model, device and dtype are used as they are).
        max_batch: >= 1, requests decoded together; more wait in arrival order.
        max_context: positions per request (prompt + new blocks - 1), default the model's
            ``max_seq_len``. The KV cache of ``max_batch x max_context`` positions is allocated here.
        cuda_graphs: capture each decode step shape as a CUDA graph. None: ``ar.options.cuda_graphs``,
            and when that is None too, on when the model is on CUDA, where a step whose requests
            include one whose selection needs the host (``top_k`` > 64 with ``top_p`` < 1) runs
            eagerly. True: such requests are refused at :meth:`add_request`. True off CUDA raises.
    """

    def __init__(
        self,
        ar: KelixAR,
        *,
        max_batch: int = 32,
        max_context: int | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        if not isinstance(ar, KelixAR):
            raise TypeError(f"Engine: ar must be a KelixAR, got {type(ar).__name__}")
        limit = ar.config.llm.max_seq_len
        max_context = limit if max_context is None else max_context
        for name, value, top in (
            ("max_batch", max_batch, None),
            ("max_context", max_context, limit),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Engine: {name} must be an int >= 1, got {value!r}")
            if top is not None and value > top:
                raise ValueError(
                    f"Engine: {name} must be <= the model's max_seq_len = {top}, got {value}"
                )
        cuda_graphs = ar.options.replace(cuda_graphs=cuda_graphs).cuda_graphs  # validated
        if cuda_graphs and ar.device.type != "cuda":
            raise ValueError(
                f"Engine: cuda_graphs=True needs the model on CUDA, it is on {ar.device}"
            )
        self.ar = ar
        self.max_context = max_context
        self.cuda_graphs = ar.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphs_required = cuda_graphs is True  # else host-bound steps may run eagerly
        self._core = engine_core.EngineCore(
            ar.model, max_batch=max_batch, capacity=max_context, cuda_graphs=self.cuda_graphs
        )

    @property
    def max_batch(self) -> int:
        return self._core.max_batch

    def add_request(
        self,
        prompt_ids: torch.Tensor | Sequence[int],
        *,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        max_new_blocks: int,
        top_k: int = 1,
        top_p: float = 1.0,
        temperature: float = 1.0,
        seed: int | None = None,
        scoring: str | None = None,
        return_hidden_states: bool = False,
        request_id: str | None = None,
    ) -> str:
        """Queue one request; returns its id. Everything is checked first, with ``generate``'s messages.

        Args:
            prompt_ids: [L] text ids (a 1-D tensor or a list of ints); image placeholders are filled, in
                order, with the ids of ``pixel_values`` (tokenized here, before queueing).
            max_new_blocks: >= 1; with the prompt, at most ``max_context`` positions.
            top_k, top_p, temperature, seed: as :meth:`KelixAR.generate`, for this request.
            scoring: ``"full"`` or ``"structured"`` for this request; None: the engine's
                (``ar.options.scoring``).
            return_hidden_states: the outputs carry the last-layer states of the positions fed.
            request_id: a string unique among unfinished requests; default ``"req-<n>"``.

        Raises:
            ValueError/TypeError: bad input, a request larger than ``max_context``, a duplicate id.
        """
        if isinstance(prompt_ids, torch.Tensor) and prompt_ids.dim() != 1:
            raise ValueError(
                f"prompt_ids must be one [L] prompt, got shape {list(prompt_ids.shape)}"
            )
        scoring = self.ar.options.replace(scoring=scoring).scoring  # validated
        check_bool("return_hidden_states", return_hidden_states)
        if request_id is not None and not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str or None, got {type(request_id).__name__}")
        if request_id is not None and any(
            r.request_id == request_id for r in self._core.requests()
        ):
            raise ValueError(
                f"request_id {request_id!r} is already in use by an unfinished request"
            )
        prompts, grids = self.ar.check_requests(
            [prompt_ids],
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            max_new_blocks=max_new_blocks,
            context=(self.max_context, "max_context"),
        )
        params = SamplingParams(temperature, top_k, top_p)
        if self._graphs_required:
            reason = host_bound_reason([params], self.ar.config.llm.total_vocab)
            if reason is not None:
                raise ValueError(f"this engine captures CUDA graphs, but {reason}")
        (seed,) = requests.request_seeds(seed, 1)
        with torch.inference_mode(), self.ar.options.backend_scope():
            (groups,) = self.ar.layout_requests(prompts, pixel_values, grids)
        request = engine_core.Request(
            request_id or self._core.new_request_id(),
            groups,
            params,
            seed,
            max_new_blocks,
            scoring,
            return_hidden_states,
        )
        self._core.add(request)
        return request.request_id

    def step(self) -> list[RequestOutput]:
        """Advance every running request by one block and admit waiting ones into free slots.

        Returns one :class:`RequestOutput` per request that changed (``[]`` when nothing is queued).

        Raises:
            StepFailed: the step raised (e.g. ``torch.OutOfMemoryError``); the requests it held
                (``request_ids``) are dropped and their slots freed; the waiting ones and later calls
                are unaffected.
        """
        with torch.inference_mode(), self.ar.options.backend_scope():
            return self._core.step()

    def abort(self, request_id: str) -> None:
        """Stop a running or waiting request and free its slot now; the next :meth:`step` reports it
        with ``finish_reason="aborted"``. Raises KeyError naming an unknown id."""
        self._core.abort(request_id)

    def has_unfinished(self) -> bool:
        """Whether a request is waiting, running, or aborted and not yet reported."""
        return self._core.has_unfinished()

    def stats(self) -> EngineStats:
        """Running and waiting requests, and KV positions reserved by the running ones."""
        return self._core.stats()
