"""``RenderWorker``: the DiT + VAE stage of text to image, on a thread of its own, batching what arrives
together.

The AR part of a text-to-image request runs in the engine (batched with chat requests); its condition
then comes here. Each time the worker is free it takes every job waiting, groups those whose shapes
allow one batch (same size, steps and guidance scale), and renders each group, up to ``max_batch``
images at a time, with the conditions stacked to [B, Lc, D]. Each image's initial noise is drawn from
its own seed (``sample_latents`` with one seed per image), exactly as a lone image draws it, so
batching does not change what a seed gives.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from kelix_fast.models.dit import KelixDiT
from kelix_fast.runtime.rendering import render
from kelix_fast.runtime.timing import StageTimer
from kelix_fast.serving.async_engine import EngineStopped, RequestFailed

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    hidden: torch.Tensor  # [1, Lc, D] the condition
    mask: torch.Tensor  # [1, Lc]
    seed: int
    shape: tuple[int, int, float]  # (size, steps, guidance_scale): equal shapes render together
    future: concurrent.futures.Future


class RenderWorker:
    """Render conditions into images on a background thread.

    Args:
        dit, vae: the models (owned by this worker from now on).
        max_batch: >= 1, images rendered together.
        exclusive: a context manager factory held around each batch, for device work that must not
            overlap other work (``AsyncEngine.between_steps``); default: none.
        on_stage: called with ``("dit" | "vae", seconds)`` after each batch.
    """

    def __init__(
        self,
        dit: KelixDiT,
        vae: Any,
        *,
        max_batch: int = 8,
        exclusive: Callable[[], AbstractContextManager[Any]] = nullcontext,
        on_stage: Callable[[str, float], None] = lambda stage, seconds: None,
    ) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"RenderWorker: max_batch must be an int >= 1, got {max_batch!r}")
        self.dit, self.vae, self.max_batch = dit, vae, max_batch
        self.exclusive, self.on_stage = exclusive, on_stage
        self._ready = threading.Condition()
        self._jobs: list[_Job] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kelix-render", daemon=True)
        self._thread.start()

    async def render(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        *,
        size: int,
        steps: int,
        guidance_scale: float,
        seed: int,
    ) -> torch.Tensor:
        """condition hidden [1, Lc, D] and mask [1, Lc] -> pixels [size, size, 3] uint8 on the CPU.

        Raises :class:`EngineStopped` once :meth:`shutdown` has begun, :class:`RequestFailed` when the
        batch holding this image failed. Cancelling the caller drops the job if it has not started.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._ready:
            if self._stopping:
                raise EngineStopped("the renderer is shutting down")
            self._jobs.append(_Job(hidden, mask, seed, (size, steps, guidance_scale), future))
            self._ready.notify()
        return await asyncio.wrap_future(future)

    def pending(self) -> int:
        """Jobs waiting for the worker (not counting the batch being rendered)."""
        with self._ready:
            return len(self._jobs)

    def shutdown(self, timeout: float) -> None:
        """Refuse new jobs, render the waiting ones for up to ``timeout`` seconds, then fail the rest
        with :class:`EngineStopped` and stop the thread."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
        self._thread.join(timeout=timeout)
        with self._ready:
            jobs, self._jobs = self._jobs, []
        for job in jobs:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(EngineStopped("the renderer shut down"))

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._jobs and not self._stopping:
                    self._ready.wait()
                if not self._jobs:
                    return
                jobs, self._jobs = self._jobs, []
            groups: dict[tuple[int, int, float], list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.shape, []).append(job)
            for group in groups.values():
                for start in range(0, len(group), self.max_batch):
                    self._render(group[start : start + self.max_batch])

    def _render(self, jobs: list[_Job]) -> None:
        # A job whose caller has gone (cancelled) is dropped here.
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        size, steps, guidance_scale = jobs[0].shape
        timings: dict[str, float] = {}
        try:
            with self.exclusive(), torch.inference_mode():
                pixels = render(
                    self.dit,
                    self.vae,
                    torch.cat([job.hidden for job in jobs]),
                    torch.cat([job.mask for job in jobs]),
                    steps=steps,
                    timer=StageTimer(timings, self.dit.device),
                    guidance_scale=guidance_scale,
                    image_size=size,
                    seed=[job.seed for job in jobs],
                ).cpu()
        except Exception as error:  # e.g. out of device memory: fail this batch, keep serving
            logger.exception("kelix_fast: a render batch of %d image(s) failed", len(jobs))
            for job in jobs:
                failure = RequestFailed(f"the render batch failed: {error!r}")
                failure.__cause__ = error
                job.future.set_exception(failure)
            return
        for stage, seconds in timings.items():
            self.on_stage(stage, seconds)
        for job, image in zip(jobs, pixels):
            job.future.set_result(image)
