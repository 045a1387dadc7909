"""``AsyncEngine``: many coroutines share the engine's steps; each request equals its single run; a full
queue, an abandoned iterator, a failed step and a shutdown behave as documented."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kelix_fast import Engine, KelixAR, presets
from kelix_fast.serving.async_engine import (
    AsyncEngine,
    EngineOverloaded,
    EngineStopped,
    RequestFailed,
)

IM_START, IM_END, USER, ASSISTANT, NL = presets.IM_START, presets.IM_END, 872, 77091, 198
PROMPTS = [
    [IM_START, USER, NL, 1000 + i, 2000, IM_END, NL, IM_START, ASSISTANT, NL] for i in range(6)
]


@pytest.fixture(scope="module")
def tiny():
    return KelixAR.tiny(seed=3, device="cpu")


async def collect(engine, prompt, **kwargs):
    groups = [out.new_groups async for out in engine.generate(prompt, **kwargs)]
    return torch.cat(groups)


def alone(ar, prompt, blocks, **kwargs):
    out = ar.generate([prompt], max_new_blocks=blocks, **kwargs)
    return out.groups[0, len(prompt) : int(out.lengths[0])]


def test_concurrent_requests_share_steps_and_equal_single_runs(tiny):
    engine = AsyncEngine(Engine(tiny, max_batch=4, max_context=32), max_queue=8)

    async def main():
        return await asyncio.gather(
            *(
                collect(engine, p, max_new_blocks=3 + i, top_k=0, seed=i)
                for i, p in enumerate(PROMPTS)
            )
        )

    results = asyncio.run(main())
    for i, (prompt, got) in enumerate(zip(PROMPTS, results)):
        assert torch.equal(got, alone(tiny, prompt, 3 + i, top_k=0, seed=i)), i
    assert engine.stats()["blocks"] == sum(r.shape[0] for r in results)
    engine.shutdown(timeout=5)


def test_a_full_queue_refuses_at_once(tiny):
    engine = AsyncEngine(Engine(tiny, max_batch=1, max_context=32), max_queue=1)

    async def main():
        first = engine.generate(PROMPTS[0], max_new_blocks=20)
        await first.__anext__()  # running
        second = engine.generate(PROMPTS[1], max_new_blocks=2)
        third = engine.generate(PROMPTS[2], max_new_blocks=2)
        second_task = asyncio.ensure_future(second.__anext__())  # waits in the queue
        await asyncio.sleep(0.05)
        with pytest.raises(EngineOverloaded, match="queue is full"):
            await third.__anext__()
        await first.aclose()  # abandoning the first frees its slot for the second
        assert (await second_task).request_id
        await second.aclose()

    asyncio.run(main())
    engine.shutdown(timeout=5)


def test_bad_input_raises_before_anything_is_queued(tiny):
    engine = AsyncEngine(Engine(tiny, max_batch=1, max_context=32))

    async def main():
        with pytest.raises(ValueError, match="max_new_blocks must be an int >= 1"):
            await engine.generate(PROMPTS[0], max_new_blocks=0).__anext__()

    asyncio.run(main())
    assert engine.stats()["waiting"] == 0 and engine.stats()["running"] == 0
    engine.shutdown(timeout=5)


def test_a_failed_step_fails_its_requests_and_the_loop_goes_on(tiny, monkeypatch):
    engine = AsyncEngine(Engine(tiny, max_batch=2, max_context=32))
    slots = engine.engine._core.slots
    advance, calls = slots.advance, []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("injected")
        return advance(*args, **kwargs)

    monkeypatch.setattr(slots, "advance", fail_once)

    async def main():
        with pytest.raises(RequestFailed, match="OutOfMemoryError"):
            await collect(engine, PROMPTS[0], max_new_blocks=4)
        return await collect(engine, PROMPTS[1], max_new_blocks=4)

    later = asyncio.run(main())
    assert torch.equal(later, alone(tiny, PROMPTS[1], 4))
    engine.shutdown(timeout=5)


def test_shutdown_stops_admitting_and_aborts_what_is_left(tiny):
    engine = AsyncEngine(Engine(tiny, max_batch=1, max_context=64))

    async def main():
        stream = engine.generate(PROMPTS[0], max_new_blocks=50)
        await stream.__anext__()
        await asyncio.to_thread(engine.shutdown, 0.0)
        reasons = [out.finish_reason async for out in stream]
        assert reasons[-1] == "aborted"
        with pytest.raises(EngineStopped):
            await engine.generate(PROMPTS[1], max_new_blocks=2).__anext__()

    asyncio.run(main())


def test_callers_get_the_engine_between_steps_while_requests_run(tiny):
    engine = AsyncEngine(Engine(tiny, max_batch=2, max_context=512))

    async def main():
        running = engine.generate(PROMPTS[0], max_new_blocks=400)
        await running.__anext__()
        # A request that joins now is admitted at the next step and finishes alongside, and other
        # threads get the engine between two steps, long before the running request ends.
        joined = await collect(engine, PROMPTS[1], max_new_blocks=2)
        with engine.between_steps():
            during = engine.engine.stats()
        await asyncio.to_thread(engine.stats)
        still = engine.stats()["running"]
        await running.aclose()
        return joined, during, still

    joined, during, still = asyncio.run(main())
    assert torch.equal(joined, alone(tiny, PROMPTS[1], 2))
    assert during.running == 1 and still == 1
    engine.shutdown(timeout=5)
