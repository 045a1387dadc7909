"""Failures inside the server, injected in-process (the app over ``httpx.ASGITransport``, the tiny models
on the CPU): a failed engine step or render batch fails only its requests with 503 and the next request
is served; an unexpected exception is a 500 that says nothing about the internals."""

from __future__ import annotations

import pytest

# The serve extra (pip install -e ".[serve]"); a machine without it (the bare GPU image) skips these.
for _module in ("fastapi", "uvicorn", "prometheus_client", "httpx", "openai"):
    pytest.importorskip(_module, reason=f"the serve extra is not installed ({_module})")

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import torch

from kelix_fast import KelixPipeline
from kelix_fast.serving import render_worker
from kelix_fast.serving.openai_api import build_app

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
IMAGE = {"prompt": "a fox", "size": "32x32", "num_inference_steps": 1, "seed": 0}


@pytest.fixture(scope="module")
def pipeline():
    return KelixPipeline.tiny(seed=0, device="cpu")


@asynccontextmanager
async def serving(app) -> AsyncIterator[httpx.AsyncClient]:
    """The app started (its lifespan) and a client on it; unhandled exceptions become responses,
    as under a real server."""
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://kelix") as client,
    ):
        yield client


def fail_once(monkeypatch, owner, name: str) -> list[int]:
    """Make ``owner.name`` raise torch.OutOfMemoryError on its first call; returns the call log."""
    original, calls = getattr(owner, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (secret)")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return calls


def assert_failed_request(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("service_unavailable_error", "request_failed")
    assert "OutOfMemoryError" in error["message"] and "secret" not in error["message"]


def test_a_failed_step_fails_its_request_and_the_next_is_served(pipeline, monkeypatch):
    app = build_app(pipeline, max_batch=2, max_context=256)

    async def main():
        async with serving(app) as client:
            # The first block comes from the admission; the failure hits the next decode step.
            fail_once(monkeypatch, app.state.serving.engine.engine._core.slots, "advance")
            assert_failed_request(await client.post("/v1/chat/completions", json=CHAT))
            served = await client.post("/v1/chat/completions", json=CHAT)
            assert served.status_code == 200, served.text
            assert served.json()["usage"]["completion_tokens"] == 4

    asyncio.run(main())


def test_a_step_failing_mid_stream_ends_it_with_an_error_event(pipeline, monkeypatch):
    app = build_app(pipeline, max_batch=2, max_context=256)

    async def main():
        async with serving(app) as client:
            fail_once(monkeypatch, app.state.serving.engine.engine._core.slots, "advance")
            response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
            assert response.status_code == 200  # the stream had started
            events = [line.removeprefix("data: ") for line in response.text.splitlines() if line]
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["error"]["code"] == "request_failed"

    asyncio.run(main())


def test_a_failed_render_fails_its_images_and_the_next_is_served(pipeline, monkeypatch):
    app = build_app(pipeline, max_batch=2, max_context=256)

    async def main():
        async with serving(app) as client:
            calls = fail_once(monkeypatch, render_worker, "render")
            assert_failed_request(await client.post("/v1/images/generations", json=IMAGE))
            served = await client.post("/v1/images/generations", json=IMAGE)
            assert served.status_code == 200, served.text
            assert len(calls) == 2

    asyncio.run(main())


def test_an_unexpected_error_is_a_500_without_internals(pipeline, monkeypatch):
    app = build_app(pipeline, max_batch=2, max_context=256)

    def broken(*_, **__):
        raise RuntimeError("internal detail: /srv/secret/path")

    async def main():
        async with serving(app) as client:
            monkeypatch.setattr(pipeline.processor, "prepare", broken)
            response = await client.post("/v1/chat/completions", json=CHAT)
            assert response.status_code == 500
            assert response.json() == {
                "error": {
                    "message": "internal server error",
                    "type": "server_error",
                    "param": None,
                    "code": "internal_error",
                }
            }
            monkeypatch.undo()
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200

    asyncio.run(main())
