"""The server's lifecycle: what it starts (the engine loop, the render worker), the requests in flight,
and the drain at shutdown.

:class:`ServingState` is what the routes share. ``start()`` runs at the app's startup; ``drain()`` at
its shutdown (and, under ``kelix-fast serve``, on the first SIGTERM, before uvicorn closes anything):
new requests are answered 503 with Retry-After, the ones in flight get ``timeout`` seconds to finish,
then the engine aborts what is left and stops. :class:`AdmissionGate` is the HTTP side of it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from kelix_fast.engine import Engine
from kelix_fast.pipeline import KelixPipeline
from kelix_fast.serving.async_engine import AsyncEngine
from kelix_fast.serving.errors import APIError, shutting_down
from kelix_fast.serving.render_worker import RenderWorker


class ServingState:
    """The models, the engine front, the render worker and the drain state of one app.

    Args:
        pipeline: the loaded models; text to image needs its DiT and VAE (without them the image
            route answers 400).
        model_name: the id of the served model (``GET /v1/models``, the requests' ``model``).
        max_batch, max_context: the :class:`~kelix_fast.Engine`'s (its KV cache is allocated here).
        max_queue: requests that may wait for a slot (:class:`AsyncEngine`); more are refused (429).
        max_render_batch: images the DiT renders together.
        on_stage: called with (stage, seconds) by the render worker.
    """

    def __init__(
        self,
        pipeline: KelixPipeline,
        *,
        model_name: str,
        max_batch: int,
        max_queue: int,
        max_context: int | None,
        max_render_batch: int,
        on_stage: Callable[[str, float], None],
    ) -> None:
        self.pipeline, self.model_name = pipeline, model_name
        self.created = int(time.time())
        self._engine = Engine(pipeline.ar, max_batch=max_batch, max_context=max_context)
        self._max_queue, self._max_render_batch = max_queue, max_render_batch
        self._on_stage = on_stage
        self.engine: AsyncEngine | None = None
        self.renderer: RenderWorker | None = None
        self.draining = False
        self._in_flight = 0
        self._no_requests = asyncio.Event()
        self._no_requests.set()
        self._drain: asyncio.Task | None = None

    @property
    def max_context(self) -> int:
        return self._engine.max_context

    @property
    def image_sizes(self) -> list[int]:
        """Square image sides the DiT can render: multiples of its VAE factor up to its sample size."""
        if self.pipeline.dit is None:
            return []
        config = self.pipeline.dit.config
        rate = config.vae_downsample_rate
        return [rate * k for k in range(1, config.input_size + 1)]

    def start(self) -> None:
        """Start the engine loop and, with a DiT and VAE, the render worker."""
        self.engine = AsyncEngine(self._engine, max_queue=self._max_queue)
        if self.pipeline.dit is not None and self.pipeline.vae is not None:
            self.renderer = RenderWorker(
                self.pipeline.dit,
                self.pipeline.vae,
                max_batch=self._max_render_batch,
                # A decode step may capture a CUDA graph, which other threads' device work breaks.
                exclusive=self.engine.between_steps,
                on_stage=self._on_stage,
            )

    def stats(self) -> dict[str, Any] | None:
        """The engine's figures and the render queue; None before :meth:`start`."""
        if self.engine is None:
            return None
        render_queue = 0 if self.renderer is None else self.renderer.pending()
        return {**self.engine.stats(), "render_queue": render_queue}

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        """Count a request for the drain."""
        self._in_flight += 1
        self._no_requests.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._no_requests.set()

    async def drain(self, timeout: float) -> None:
        """Stop admitting, give the requests in flight ``timeout`` seconds, then abort the rest and
        stop the engine and the render worker. A second call waits for the first."""
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._run_drain(timeout))
        await asyncio.shield(self._drain)

    async def _run_drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.draining = True
        try:
            await asyncio.wait_for(self._no_requests.wait(), timeout)
        except TimeoutError:
            pass
        left = max(0.0, deadline - time.monotonic())
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown, left)
        if self.renderer is not None:
            await asyncio.to_thread(self.renderer.shutdown, max(0.0, deadline - time.monotonic()))


class AdmissionGate:
    """ASGI middleware: every HTTP request but those to ``open_paths`` (``/metrics``) is counted in
    flight, and refused with 503 + Retry-After once the server drains. ``on_error`` sees refusals."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        state: ServingState,
        open_paths: frozenset[str],
        on_error: Callable[[APIError], None],
    ) -> None:
        self.app, self.state, self.open_paths, self.on_error = app, state, open_paths, on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        if self.state.draining:
            error = shutting_down()
            self.on_error(error)
            await error.response()(scope, receive, send)
            return
        with self.state.in_flight():
            await self.app(scope, receive, send)
