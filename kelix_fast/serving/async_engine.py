"""``AsyncEngine``: the :class:`~kelix_fast.Engine` step loop on a thread of its own, for asyncio servers.

Coroutines add requests and iterate their outputs; one background thread runs ``Engine.step()`` while
any request is unfinished, so every running request of every caller is decoded in the same steps
(continuous batching). Model work (a request's image tokenization at admission, the steps) holds one
lock, which the loop hands to waiting callers between steps. A caller that stops iterating (a client
that disconnected) aborts its request, which frees its slot at the next step. A step that fails
(``StepFailed``: e.g. out of device memory) fails only the requests it held, with
:class:`RequestFailed`; the loop goes on.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kelix_fast.engine import Engine, RequestOutput, StepFailed

__all__ = ["AsyncEngine", "EngineOverloaded", "EngineStopped", "RequestFailed"]


class EngineOverloaded(RuntimeError):
    """The waiting queue is full (``max_queue``): retry later (HTTP 429)."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and admits nothing (HTTP 503)."""


class RequestFailed(RuntimeError):
    """The step that held this request failed (its cause is chained); other requests were unaffected."""


@dataclass
class _Waiter:
    """Where one request's outputs go: an asyncio queue on the caller's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    """Serve :class:`~kelix_fast.Engine` requests from coroutines.

    Args:
        engine: the engine; this object owns it from now on (call it only through here).
        max_queue: >= 0, requests that may wait for a slot; one more is refused at once with
            :class:`EngineOverloaded`.
    """

    def __init__(self, engine: Engine, *, max_queue: int = 256) -> None:
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"AsyncEngine: max_queue must be an int >= 0, got {max_queue!r}")
        self.engine = engine
        self.max_queue = max_queue
        self._lock = threading.Lock()  # the engine and the model: one caller at a time
        self._work = threading.Condition(self._lock)
        # Threads waiting for the lock. The loop re-takes it right after each step, so with a plain
        # lock it would keep it for as long as requests run; it lets these in before each step.
        self._callers = 0
        self._callers_done = threading.Condition()
        self._waiters: dict[str, _Waiter] = {}
        self._idle = threading.Event()  # no caller waits for outputs (what shutdown waits for)
        self._idle.set()
        self._accepting = True
        self._stopped = False
        self.blocks = 0  # new groups produced since start (for blocks/s)
        self.step_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="kelix-engine-loop", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ requests

    async def generate(self, prompt_ids: Any, **request: Any) -> AsyncIterator[RequestOutput]:
        """Add a request (``Engine.add_request`` arguments) and yield its outputs until it finishes.

        Raises (before yielding): ValueError/TypeError for bad input, :class:`EngineOverloaded`,
        :class:`EngineStopped`; while yielding: :class:`RequestFailed`. Closing the iterator early
        aborts the request.
        """
        waiter = _Waiter(asyncio.get_running_loop(), asyncio.Queue())
        request_id = await asyncio.to_thread(self._add, prompt_ids, waiter, request)
        finished = False
        try:
            while not finished:
                item = await waiter.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort an unfinished request (no error if it has just finished)."""
        with self._turn():
            if self._waiters.pop(request_id, None) is not None:
                self.engine.abort(request_id)
                self._work.notify()
                if not self._waiters:
                    self._idle.set()

    @contextmanager
    def between_steps(self) -> Iterator[None]:
        """Hold the engine between two steps (none runs meanwhile): for other model work on its
        device that must not overlap a step, e.g. the DiT next to a step that captures a CUDA graph
        (a capture forbids other threads' allocations and synchronisations)."""
        with self._turn():
            yield

    def stats(self) -> dict[str, Any]:
        """Running and waiting requests, KV use, blocks produced and time spent stepping."""
        with self._turn():
            stats = self.engine.stats()
        return {
            "running": stats.running,
            "waiting": stats.waiting,
            "max_batch": stats.max_batch,
            "kv_usage": stats.kv_usage,
            "blocks": self.blocks,
            "step_seconds": self.step_seconds,
        }

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop admitting, let the running and waiting requests finish for up to ``timeout`` seconds,
        then abort the rest (their callers get an ``"aborted"`` output) and stop the loop."""
        deadline = time.monotonic() + timeout
        with self._turn():
            self._accepting = False
        self._idle.wait(timeout=max(0.0, deadline - time.monotonic()))
        with self._turn():
            for request_id in list(self._waiters):
                self.engine.abort(request_id)
            self._stopped = True
            self._work.notify()
        self._thread.join(timeout=max(1.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ the loop

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """The lock, for any thread but the loop's: counted, so the loop lets it in at the next step."""
        with self._callers_done:
            self._callers += 1
        try:
            with self._work:
                yield
        finally:
            with self._callers_done:
                self._callers -= 1
                self._callers_done.notify_all()

    def _add(self, prompt_ids: Any, waiter: _Waiter, request: dict[str, Any]) -> str:
        with self._turn():
            if not self._accepting:
                raise EngineStopped("the engine is shutting down")
            if self.engine.stats().waiting >= self.max_queue:
                raise EngineOverloaded(
                    f"the queue is full ({self.max_queue} requests waiting); retry later"
                )
            request_id = self.engine.add_request(prompt_ids, **request)
            self._waiters[request_id] = waiter
            self._idle.clear()
            self._work.notify()
        return request_id

    def _run(self) -> None:
        while True:
            with self._callers_done:
                while self._callers:
                    self._callers_done.wait()
            with self._work:
                while not self._stopped and not self.engine.has_unfinished():
                    self._work.wait()
                if self._stopped and not self.engine.has_unfinished():
                    return
                start = time.perf_counter()
                try:
                    outputs = self.engine.step()
                    failed: StepFailed | None = None
                except StepFailed as error:
                    outputs, failed = [], error
                self.step_seconds += time.perf_counter() - start
                for output in outputs:
                    self.blocks += output.new_groups.shape[0]
                    waiter = self._waiters.get(output.request_id)
                    if waiter is None:
                        continue  # aborted by its caller: nobody listens
                    if output.finished:
                        del self._waiters[output.request_id]
                    waiter.put(output)
                if failed is not None:
                    for request_id in failed.request_ids:
                        waiter = self._waiters.pop(request_id, None)
                        if waiter is not None:
                            error = RequestFailed(
                                f"request {request_id} failed: {failed.__cause__!r}"
                            )
                            error.__cause__ = failed.__cause__
                            waiter.put(error)
                if not self._waiters:
                    self._idle.set()
