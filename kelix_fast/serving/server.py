"""Running the server: the models from their options (:func:`build_pipeline`), and the app under uvicorn
with a graceful shutdown (:func:`run_server`). ``kelix-fast serve`` is these two around
:func:`~kelix_fast.serving.openai_api.build_app`."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import torch
import uvicorn
from fastapi import FastAPI

from kelix_fast.options import EngineOptions
from kelix_fast.pipeline import KelixPipeline

logger = logging.getLogger(__name__)


def build_pipeline(
    *,
    ar: str | os.PathLike[str] | None = None,
    dit: str | os.PathLike[str] | None = None,
    vae: str | os.PathLike[str] | None = None,
    tiny: bool = False,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    model_max_length: int | None = None,
    options: EngineOptions | None = None,
) -> KelixPipeline:
    """The models to serve: the checkpoint directories ``ar`` (Kelix-SFT) and, for text to image,
    ``dit`` and ``vae`` (``model_max_length``: the DiT's condition rows, 720 for the release); or, with
    ``tiny=True``, the embedded tiny models (random weights from ``seed``).

    Raises ValueError for a combination that names no model or two, or a DiT without its VAE.
    """
    if tiny == (ar is not None):
        raise ValueError("build_pipeline: give either tiny=True or ar (a Kelix-SFT directory)")
    if (dit is None) != (vae is None):
        raise ValueError("build_pipeline: dit and vae go together (text to image needs both)")
    if tiny:
        if dit is not None or model_max_length is not None:
            raise ValueError(
                "build_pipeline: tiny=True embeds its DiT and VAE; dit, vae and model_max_length "
                "must be None"
            )
        return KelixPipeline.tiny(seed, device=device, dtype=dtype, options=options)
    return KelixPipeline.from_pretrained(
        ar, dit, vae, device=device, dtype=dtype, model_max_length=model_max_length, options=options
    )


def served_model_name(*, tiny: bool, ar: str | os.PathLike[str] | None) -> str:
    """The model id clients see when none is given: ``kelix-tiny``, or the Kelix-SFT folder's name."""
    return "kelix-tiny" if tiny else os.path.basename(os.path.normpath(ar))


def run_server(
    app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0
) -> None:
    """Serve ``app`` (from :func:`~kelix_fast.serving.openai_api.build_app`) until SIGTERM or SIGINT.

    The first signal drains the app while it still listens: new requests are answered 503 with
    Retry-After (so clients and load balancers go elsewhere), those in flight get
    ``shutdown_timeout`` seconds, then the rest are aborted; then uvicorn closes the connections and
    runs the app's shutdown. A second signal stops at once. Returns when the server has stopped.
    """
    config = uvicorn.Config(
        app, host=host, port=port, timeout_graceful_shutdown=max(1, round(shutdown_timeout))
    )
    _DrainingServer(config, lambda: app.state.serving.drain(shutdown_timeout)).run()


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, with a drain of the app before its own shutdown. (uvicorn's shutdown stops
    listening first, and re-raises the signal after it, so the process would not exit with 0.)"""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain
        self._draining: asyncio.Task | None = None

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._draining is None:
            logger.warning("kelix_fast: %s: draining, then shutting down", sig.name)
            self._draining = asyncio.ensure_future(self._drain_then_exit())
        else:
            self.force_exit = True
            self.should_exit = True

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain()
        finally:
            self.should_exit = True
