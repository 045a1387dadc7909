"""Many clients at once against a live ``kelix-fast serve --tiny --device cpu``: each answer equals what
the same request gets alone, nothing is lost; and a bounded load run on loopback, recorded to JSON."""

from __future__ import annotations

import pytest

# The serve extra (pip install -e ".[serve]"); a machine without it (the bare GPU image) skips these.
for _module in ("fastapi", "uvicorn", "prometheus_client", "httpx", "openai"):
    pytest.importorskip(_module, reason=f"the serve extra is not installed ({_module})")

import asyncio
import base64
import io
import json
import statistics
import time

import httpx
import numpy as np
import openai
from PIL import Image

MODEL = "kelix-tiny"
CHATS = [
    {
        "messages": [{"role": "user", "content": f"question {i}: " + "why? " * i}],
        "max_tokens": 3 + i,
    }
    for i in range(8)
]
IMAGES = [
    {"prompt": f"a fox, picture {i}", "size": "64x64", "seed": i, "num_inference_steps": 2}
    for i in range(4)
]


async def ask(client: openai.AsyncOpenAI, request: dict) -> tuple:
    """What a chat answer is made of: its text, finish reason and counts."""
    completion = await client.chat.completions.create(model=MODEL, temperature=0, **request)
    (choice,) = completion.choices
    return choice.message.content, choice.finish_reason, completion.usage.model_dump()


async def draw(client: openai.AsyncOpenAI, request: dict) -> np.ndarray:
    """An image request's pixels [64, 64, 3] uint8."""
    fields = dict(request)
    extra = {k: fields.pop(k) for k in ("seed", "num_inference_steps")}
    result = await client.images.generate(model=MODEL, extra_body=extra, **fields)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))))


def test_32_concurrent_clients_each_get_their_lone_answer(server):
    async def main():
        async with openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300
        ) as client:
            alone_chats = [await ask(client, request) for request in CHATS]
            alone_images = [await draw(client, request) for request in IMAGES]
            # 24 chats (each request 3 times) and 8 images (each twice), all at once.
            jobs = [ask(client, CHATS[i % 8]) for i in range(24)]
            jobs += [draw(client, IMAGES[i % 4]) for i in range(8)]
            results = await asyncio.gather(*jobs)
        return alone_chats, alone_images, results

    alone_chats, alone_images, results = asyncio.run(main())
    assert len(results) == 32
    for i, answer in enumerate(results[:24]):
        assert answer == alone_chats[i % 8], i  # greedy: text, finish reason and counts equal
    for i, pixels in enumerate(results[24:]):
        # The image blocks are equal; their hidden states, computed in batches of another size, may
        # differ in the last float32 bit (CPU matmul blocking), which can move a pixel by one level.
        assert np.abs(pixels.astype(int) - alone_images[i % 4]).max() <= 1, i


def test_bounded_load_run(server, tmp_path):
    requests, concurrency, cap_seconds = 64, 16, 120
    latencies: list[float] = []
    errors: list[str] = []

    async def main():
        queue = list(range(requests))
        async with httpx.AsyncClient(base_url=server.url, timeout=cap_seconds) as http:

            async def worker():
                while queue:
                    i = queue.pop()
                    body = {
                        "messages": [{"role": "user", "content": f"load {i}"}],
                        "max_tokens": 8,
                        "temperature": 0,
                    }
                    start = time.perf_counter()
                    response = await http.post("/v1/chat/completions", json=body)
                    latencies.append(time.perf_counter() - start)
                    if response.status_code != 200:
                        errors.append(response.text)

            start = time.perf_counter()
            await asyncio.wait_for(
                asyncio.gather(*(worker() for _ in range(concurrency))), cap_seconds
            )
            return time.perf_counter() - start

    wall = asyncio.run(main())
    ordered = sorted(latencies)
    figures = {
        "requests": requests,
        "concurrency": concurrency,
        "max_tokens": 8,
        "temperature": 0,
        "device": "cpu",
        "wall_seconds": wall,
        "requests_per_second": requests / wall,
        "p50_seconds": statistics.median(ordered),
        "p99_seconds": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
    }
    (tmp_path / "load.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures))
    assert not errors, errors[:3]
    assert len(latencies) == requests
