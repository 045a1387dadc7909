"""The official ``openai`` client against a live ``kelix-fast serve --tiny --device cpu``: chat (plain,
streamed, with an image as a data URI), images (base64 PNGs of the asked size), models; and the
server's health and metrics."""

from __future__ import annotations

import pytest

# The serve extra (pip install -e ".[serve]"); a machine without it (the bare GPU image) skips these.
for _module in ("fastapi", "uvicorn", "prometheus_client", "httpx", "openai"):
    pytest.importorskip(_module, reason=f"the serve extra is not installed ({_module})")

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

MODEL = "kelix-tiny"


def data_uri(height: int, width: int) -> str:
    """A PNG colour gradient as a data URI."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    pixels[..., 1] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(question: str) -> dict:
    return {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": data_uri(56, 84)}},
            {"type": "text", "text": question},
        ],
    }


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_chat_completion_with_an_image(client):
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[image_message("What is in this picture?")],
        max_tokens=5,
        temperature=0,
    )
    (choice,) = completion.choices
    assert completion.object == "chat.completion" and completion.model == MODEL
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.completion_tokens <= 5  # blocks
    assert usage.completion_tokens == 5 or choice.finish_reason == "stop"
    # The image's 56 x 84 pixels are 2 x 3 merged patches: 6 placeholder positions.
    text_only = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is in this picture?"}],
        max_tokens=1,
    )
    assert usage.prompt_tokens == text_only.usage.prompt_tokens + 2 + 6  # vision start/end + pads
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_chat_equals_the_plain_one(client):
    request = {"model": MODEL, "messages": [image_message("Describe it.")], "max_tokens": 6}
    plain = client.chat.completions.create(**request, temperature=0)
    chunks = list(
        client.chat.completions.create(
            **request, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_the_stream_ends_with_done(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"


def test_images_are_pngs_of_the_asked_size(client):
    result = client.images.generate(
        model=MODEL,
        prompt="a red fox in snow",
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"num_inference_steps": 2, "seed": 7},
    )
    assert len(result.data) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    assert all(image.format == "PNG" and image.size == (64, 64) for image in images)
    # Image i is drawn from seed + i: the two differ, and a request for the second alone equals it.
    first, second = (np.asarray(image) for image in images)
    assert not np.array_equal(first, second)
    alone = client.images.generate(
        model=MODEL,
        prompt="a red fox in snow",
        size="64x64",
        extra_body={"num_inference_steps": 2, "seed": 8},
    )
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(alone.data[0].b64_json))))
    assert np.abs(pixels.astype(int) - second).max() <= 1  # see test_concurrency.py on the 1


def test_models_lists_the_served_model(client):
    (model,) = client.models.list().data
    assert model.id == MODEL and model.object == "model"


def test_health_and_metrics(server, client):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    httpx.post(f"{server.url}/v1/nowhere", json={})  # an error, counted
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        'kelix_requests_total{route="/health",status="200"}',
        'kelix_requests_total{route="other",status="404"}',
        'kelix_errors_total{code="none",type="invalid_request_error"}',
        "kelix_queue_length",
        "kelix_running_requests",
        "kelix_blocks_total",
        'kelix_stage_seconds_bucket{le="0.001",stage="preprocess"}',
    ):
        assert name in text, name
