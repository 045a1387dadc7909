"""Admission control on a live ``kelix-fast serve --tiny --device cpu``: the API key, a full queue (429 at
once), clients that disconnect (their slot is freed), and the drain on SIGTERM (new requests 503 with
Retry-After, running ones finish or are aborted at the timeout, exit status 0)."""

from __future__ import annotations

import pytest

# The serve extra (pip install -e ".[serve]"); a machine without it (the bare GPU image) skips these.
for _module in ("fastapi", "uvicorn", "prometheus_client", "httpx", "openai"):
    pytest.importorskip(_module, reason=f"the serve extra is not installed ({_module})")

import asyncio
import json
import time

import httpx
import pytest

from tests.serving.live_server import LiveServer

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# The tiny model's context holds about 4000 new blocks; at one slot on this CPU, minutes of work.
LONG = 4000


def chat(max_tokens: int, **fields) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, **fields}


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory):
    """One decode slot, one waiting request, an API key."""
    live = LiveServer(
        tmp_path_factory.mktemp("one_slot") / "server.log",
        *("--max-batch", "1", "--max-queue", "1", "--api-key", KEY),
    )
    yield live
    live.stop_cleanly()


class Events:
    """The events of a streamed response, read as they come. (One line iterator for the whole
    response: an abandoned one is closed when collected, which closes the connection.)"""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.aiter_lines()

    async def next(self) -> str:
        async for line in self.lines:
            if line:
                return line.removeprefix("data: ")
        raise AssertionError("the stream ended")

    async def rest(self) -> list[str]:
        return [line.removeprefix("data: ") async for line in self.lines if line]


def test_every_route_but_health_needs_the_key(one_slot):
    url = one_slot.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.post(f"{url}/v1/chat/completions", json=chat(1), headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{url}/metrics").status_code == 401
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200
    response = httpx.post(f"{url}/v1/chat/completions", json=chat(1), headers=AUTH, timeout=60)
    assert response.status_code == 200


def test_a_full_queue_answers_429_at_once(one_slot):
    async def main():
        async with httpx.AsyncClient(base_url=one_slot.url, headers=AUTH, timeout=120) as http:
            async with http.stream(
                "POST", "/v1/chat/completions", json=chat(LONG, stream=True)
            ) as running:
                running_events = Events(running)  # kept: see Events
                await running_events.next()
                waiting = asyncio.create_task(http.post("/v1/chat/completions", json=chat(2)))
                await asyncio.sleep(0.5)  # queued behind the running one
                start = time.monotonic()
                refused = await http.post("/v1/chat/completions", json=chat(2))
                assert time.monotonic() - start < 2
                assert refused.status_code == 429
                assert refused.headers["retry-after"] == "1"
                error = refused.json()["error"]
                assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full")
                assert not waiting.done()
            # Leaving the stream disconnects it: its request is aborted and the waiting one runs.
            start = time.monotonic()
            served = await waiting
            assert served.status_code == 200, served.text
            assert time.monotonic() - start < 20

    asyncio.run(main())


def test_a_client_that_disconnects_frees_its_slot(one_slot):
    async def main():
        async with httpx.AsyncClient(base_url=one_slot.url, headers=AUTH) as http:
            with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
                await http.post("/v1/chat/completions", json=chat(LONG), timeout=2)
            start = time.monotonic()
            response = await http.post("/v1/chat/completions", json=chat(2), timeout=60)
            assert response.status_code == 200, response.text
            assert time.monotonic() - start < 20  # not behind the abandoned request
            metrics = (await http.get("/metrics")).text
            assert "kelix_running_requests 0.0" in metrics
            assert "kelix_queue_length 0.0" in metrics

    asyncio.run(main())


def test_sigterm_drains_then_exits_cleanly(tmp_path):
    live = LiveServer(tmp_path / "server.log", "--max-batch", "2", "--shutdown-timeout", "5")

    async def main():
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
            short_request = chat(10, stream=True)
            long_request = chat(LONG, stream=True)
            async with (
                http.stream("POST", "/v1/chat/completions", json=short_request) as short,
                http.stream("POST", "/v1/chat/completions", json=long_request) as long,
            ):
                short_events, long_events = Events(short), Events(long)
                await short_events.next()
                await long_events.next()
                live.process.terminate()  # SIGTERM
                await asyncio.sleep(0.5)
                refused = await http.post("/v1/chat/completions", json=chat(2))
                assert refused.status_code == 503
                assert refused.headers["retry-after"] == "10"
                assert refused.json()["error"]["code"] == "shutting_down"
                assert (await http.get("/health")).status_code == 503
                finished = await short_events.rest()  # in time: it finishes
                assert finished[-1] == "[DONE]"
                assert json.loads(finished[-2])["choices"][0]["finish_reason"] == "length"
                start = time.monotonic()
                aborted = await long_events.rest()  # not in time: aborted at the timeout
                assert aborted[-1] == "[DONE]"
                assert json.loads(aborted[-2])["error"]["code"] == "shutting_down"
                assert time.monotonic() - start < 15

    asyncio.run(main())
    assert live.process.wait(timeout=30) == 0, live.output()
    output = live.output()
    assert "Traceback" not in output, output
    assert "SIGTERM: draining" in output and "Application shutdown complete" in output
