"""``RenderWorker`` on the tiny DiT and VAE (CPU): jobs waiting together render in one batch when their
shapes allow it, each image equal to its lone render; a job whose caller left is skipped; a shutdown
fails what it could not render."""

from __future__ import annotations

import pytest

# The serve extra (pip install -e ".[serve]"); a machine without it (the bare GPU image) skips these.
for _module in ("fastapi", "uvicorn", "prometheus_client", "httpx", "openai"):
    pytest.importorskip(_module, reason=f"the serve extra is not installed ({_module})")

import asyncio
import threading

import pytest
import torch

from kelix_fast import presets
from kelix_fast.runtime.rendering import render
from kelix_fast.runtime.timing import StageTimer
from kelix_fast.serving import render_worker
from kelix_fast.serving.async_engine import EngineStopped
from kelix_fast.serving.render_worker import RenderWorker


@pytest.fixture(scope="module")
def models():
    return presets.tiny_dit(0, device="cpu"), presets.tiny_vae(0, device="cpu")


def condition(seed: int, length: int = 16, width: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A random condition hidden [1, Lc, D] with its mask [1, Lc] (the first rows valid)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, length, width, generator=generator)
    mask = torch.zeros(1, length, dtype=torch.int64)
    mask[0, : 4 + seed] = 1
    return hidden * mask[..., None], mask


def alone(models, hidden, mask, *, size, steps, seed) -> torch.Tensor:
    dit, vae = models
    with torch.inference_mode():
        return render(
            dit,
            vae,
            hidden,
            mask,
            steps=steps,
            timer=StageTimer(None, dit.device),
            image_size=size,
            seed=seed,
        )[0]


def test_jobs_waiting_together_render_in_batches_of_one_shape(models, monkeypatch):
    batches = []

    def counted(dit, vae, hidden, mask, **kwargs):
        batches.append((hidden.shape[0], kwargs["image_size"]))
        return render(dit, vae, hidden, mask, **kwargs)

    monkeypatch.setattr(render_worker, "render", counted)
    gate = threading.Lock()
    worker = RenderWorker(*models, max_batch=2, exclusive=lambda: gate)
    jobs = [(condition(i), size) for i, size in enumerate((32, 64, 32, 32))]

    def submit(i: int, cond, size: int) -> asyncio.Future:
        return asyncio.ensure_future(
            worker.render(*cond, size=size, steps=2, guidance_scale=1.0, seed=i)
        )

    async def main():
        with gate:
            blocker = submit(99, condition(5), 32)
            await asyncio.sleep(0.2)  # the worker holds it, waiting for the gate
            tasks = [submit(i, cond, size) for i, (cond, size) in enumerate(jobs)]
            await asyncio.sleep(0.2)  # all four wait together
        await blocker
        return await asyncio.gather(*tasks)

    images = asyncio.run(main())
    worker.shutdown(timeout=5)
    # The blocker alone; then the 32-pixel jobs (0, 2, 3) at most two at a time, and the 64 one.
    assert batches == [(1, 32), (2, 32), (1, 32), (1, 64)]
    for i, ((hidden, mask), size) in enumerate(jobs):
        expected = alone(models, hidden, mask, size=size, steps=2, seed=i)
        assert images[i].shape == (size, size, 3) and torch.equal(images[i], expected), i


def test_a_job_whose_caller_left_is_skipped(models, monkeypatch):
    sizes = []
    monkeypatch.setattr(
        render_worker, "render", lambda *a, **k: sizes.append(a[2].shape[0]) or render(*a, **k)
    )
    gate = threading.Lock()
    worker = RenderWorker(*models, exclusive=lambda: gate)

    async def main():
        with gate:
            first = asyncio.ensure_future(
                worker.render(*condition(0), size=32, steps=1, guidance_scale=1.0, seed=0)
            )
            await asyncio.sleep(0.1)  # the worker holds the first job, waiting for the gate
            left = asyncio.ensure_future(
                worker.render(*condition(1), size=32, steps=1, guidance_scale=1.0, seed=1)
            )
            await asyncio.sleep(0.1)
            left.cancel()
        await first
        await asyncio.sleep(0.2)

    asyncio.run(main())
    worker.shutdown(timeout=5)
    assert sizes == [1]  # the cancelled job never rendered


def test_shutdown_refuses_new_jobs(models):
    worker = RenderWorker(*models)
    worker.shutdown(timeout=5)

    async def main():
        with pytest.raises(EngineStopped):
            await worker.render(*condition(0), size=32, steps=1, guidance_scale=1.0, seed=0)

    asyncio.run(main())
