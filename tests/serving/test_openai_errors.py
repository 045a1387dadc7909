"""Every client error the server knows, sent raw with httpx to a live ``kelix-fast serve --tiny --device
cpu``: the status, and OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import pytest

# The serve extra (pip install -e ".[serve]"); a machine without it (the bare GPU image) skips these.
for _module in ("fastapi", "uvicorn", "prometheus_client", "httpx", "openai"):
    pytest.importorskip(_module, reason=f"the serve extra is not installed ({_module})")

import base64
import io

import httpx
import pytest
from PIL import Image

from kelix_fast.serving.protocol import MAX_BODY_BYTES, MAX_IMAGES_PER_REQUEST

CHAT, IMAGES = "/v1/chat/completions", "/v1/images/generations"


def chat(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def png_uri(side: int = 56) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def error_of(response: httpx.Response, status: int, code: str | None, param: str | None = None):
    """The response's error object, after checking the status and the shape."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    assert error["code"] == code and error["param"] == param
    return error


def test_malformed_json(http):
    json_type = {"content-type": "application/json"}
    for body in (b'{"messages": [', b'{"messages": "\xff"}', b"[" * 100_000 + b"]" * 100_000):
        response = http.post(CHAT, content=body, headers=json_type)
        assert error_of(response, 400, "invalid_json")["type"] == "invalid_request_error"


def test_a_body_that_is_not_a_json_object(http):
    error_of(http.post(CHAT, json=[1, 2]), 400, "invalid_body")


def test_unknown_fields_are_rejected(http):
    error = error_of(
        http.post(CHAT, json=chat(frequency_penalty=0.5)), 400, "unknown_field", "frequency_penalty"
    )
    assert "frequency_penalty" in error["message"]
    nested = chat()
    nested["messages"][0]["name"] = "bob"
    error_of(http.post(CHAT, json=nested), 400, "unknown_field", "messages[0].name")


def test_wrong_types_are_rejected(http):
    error_of(http.post(CHAT, json=chat(max_tokens="2")), 400, "invalid_type", "max_tokens")
    bad_part = chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}])
    error_of(http.post(CHAT, json=bad_part), 400, "invalid_type", "messages[0].content[0].text")


def test_out_of_range_values(http):
    error_of(http.post(CHAT, json=chat(temperature=3)), 400, "invalid_value", "temperature")
    error_of(http.post(CHAT, json=chat(n=2)), 400, "invalid_value", "n")
    error_of(http.post(IMAGES, json={"prompt": "x", "n": 9}), 400, "invalid_value", "n")


def test_bad_image_data(http):
    body = chat(messages=[{"role": "user", "content": [image_part("data:image/png;base64,@@@")]}])
    error = error_of(
        http.post(CHAT, json=body), 400, "invalid_image", "messages[0].content[0].image_url.url"
    )
    assert "base64" in error["message"]
    not_png = "data:image/png;base64," + base64.b64encode(b"GIF89a not a png").decode()
    body = chat(messages=[{"role": "user", "content": [image_part(not_png)]}])
    error_of(
        http.post(CHAT, json=body), 400, "invalid_image", "messages[0].content[0].image_url.url"
    )


def test_remote_image_urls_are_refused(http):
    body = chat(messages=[{"role": "user", "content": [image_part("https://example.com/cat.png")]}])
    error = error_of(
        http.post(CHAT, json=body), 400, "invalid_image", "messages[0].content[0].image_url.url"
    )
    assert "remote image URLs are not supported" in error["message"]


def test_too_many_images(http):
    parts = [image_part(png_uri())] * (MAX_IMAGES_PER_REQUEST + 1)
    body = chat(messages=[{"role": "user", "content": parts}])
    error_of(http.post(CHAT, json=body), 400, "too_many_images", "messages")


def test_a_declared_oversized_body(http):
    # The declared length is refused before a byte of the body is read.
    body = b'{"messages": "' + b"x" * MAX_BODY_BYTES + b'"}'
    response = http.post(CHAT, content=body, headers={"content-type": "application/json"})
    error_of(response, 413, "request_too_large")


def test_a_streamed_oversized_body(http):
    def chunks():
        yield b'{"messages": "'
        for _ in range(MAX_BODY_BYTES // 2**20 + 1):
            yield b"x" * 2**20
        yield b'"}'

    response = http.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    error_of(response, 413, "request_too_large")


def test_a_prompt_too_large_for_the_context(http):
    # The tiny model's context is 4096 positions.
    error = error_of(http.post(CHAT, json=chat(max_tokens=5000)), 400, "invalid_value")
    assert "max_context" in error["message"]


def test_unknown_route(http):
    error = error_of(http.post("/v1/completions", json={}), 404, None)
    assert error["message"] == "Invalid URL (POST /v1/completions)"


def test_wrong_method(http):
    error_of(http.get(CHAT), 405, None)


def test_unknown_model(http):
    error_of(http.post(CHAT, json=chat(model="gpt-4o")), 404, "model_not_found", "model")


def test_image_url_response_format_is_refused(http):
    error = error_of(
        http.post(IMAGES, json={"prompt": "a fox", "response_format": "url"}),
        400,
        "invalid_value",
        "response_format",
    )
    assert "b64_json" in error["message"]


def test_unsupported_image_size(http):
    error = error_of(
        http.post(IMAGES, json={"prompt": "a fox", "size": "1024x1024"}),
        400,
        "invalid_value",
        "size",
    )
    # The tiny DiT: 32-pixel steps up to its 5 x 32 = 160-pixel sample size.
    assert "32x32, 64x64, 96x96, 128x128, 160x160" in error["message"]
