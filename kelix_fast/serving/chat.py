"""``POST /v1/chat/completions``: OpenAI chat messages -> the engine -> one completion, or a stream of
Server-Sent Events (one chunk per block that adds text, then ``data: [DONE]``).

``max_tokens`` counts blocks; ``usage`` counts prompt positions and new blocks. The answer's text is
what ``KelixPipeline.chat`` returns for the same messages and sampling.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from kelix_fast.engine import RequestOutput
from kelix_fast.processor import KelixProcessor
from kelix_fast.serving.detokenizer import TextStream
from kelix_fast.serving.disconnect import cancel_on_disconnect
from kelix_fast.serving.errors import APIError, bad_request, engine_errors, shutting_down
from kelix_fast.serving.images import InvalidImage, decode_data_uri
from kelix_fast.serving.lifecycle import ServingState
from kelix_fast.serving.metrics import ServerMetrics
from kelix_fast.serving.protocol import (
    DEFAULT_MAX_TOKENS,
    MAX_IMAGE_PIXELS,
    MAX_IMAGES_PER_REQUEST,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChatMessageOut,
    ChunkChoice,
    ChunkDelta,
    ContentPart,
    Usage,
)

logger = logging.getLogger(__name__)

_FINISH_REASONS = {"eos": "stop", "length": "length"}


async def create_chat_completion(
    state: ServingState, metrics: ServerMetrics, body: ChatCompletionRequest, request: Request
) -> ChatCompletion | StreamingResponse:
    """Run one chat request through the engine. Admission errors (400, 429, 503) are raised before
    anything is sent, so a stream starts only once the request holds a slot and has its first block."""
    assert state.engine is not None  # started with the app
    start = time.perf_counter()
    inputs = await asyncio.to_thread(_prepare, state.pipeline.processor, body.messages)
    metrics.observe("preprocess", time.perf_counter() - start)
    prompt_ids = inputs["prompt_ids"][0]
    prompt_length = prompt_ids.shape[0]
    images = {}
    if inputs["image_grid_thw"].shape[0]:
        images = {k: inputs[k] for k in ("pixel_values", "image_grid_thw")}
    max_blocks = body.max_blocks or max(
        1, min(DEFAULT_MAX_TOKENS, state.max_context - prompt_length + 1)
    )
    outputs = state.engine.generate(
        prompt_ids, max_new_blocks=max_blocks, **_sampling(body), **images
    )
    answer = _Answer(
        f"chatcmpl-{uuid.uuid4().hex}", body, state, metrics, prompt_length, time.perf_counter()
    )
    if body.stream:
        async with cancel_on_disconnect(request):
            first = await answer.first(outputs)
        # The stream's generator owns the iterator from here; the server closes it if the client goes.
        return StreamingResponse(
            answer.events(first, outputs),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    async with aclosing(outputs), cancel_on_disconnect(request):
        output = await answer.first(outputs)
        text = answer.stream.push(output.new_groups)
        while not output.finished:
            output = await answer.next(outputs)
            text += answer.stream.push(output.new_groups)
    answer.done()
    return ChatCompletion(
        id=answer.id,
        model=state.model_name,
        choices=[
            ChatChoice(
                message=ChatMessageOut(content=text + answer.stream.finish()),
                finish_reason=_FINISH_REASONS[output.finish_reason],
            )
        ],
        usage=answer.usage(),
    )


def _prepare(processor: KelixProcessor, messages: list[ChatMessage]) -> dict[str, Any]:
    """The messages -> the processor's tensors (images decoded from their data URIs). Blocking."""
    count = sum(
        part.type == "image_url"
        for message in messages
        if not isinstance(message.content, str)
        for part in message.content
    )
    if count > MAX_IMAGES_PER_REQUEST:
        raise APIError(
            400,
            f"a request may hold at most {MAX_IMAGES_PER_REQUEST} images, got {count}",
            code="too_many_images",
            param="messages",
        )
    converted = [
        {
            "role": message.role,
            "content": message.content
            if isinstance(message.content, str)
            else [
                _part(part, f"messages[{i}].content[{j}]") for j, part in enumerate(message.content)
            ],
        }
        for i, message in enumerate(messages)
    ]
    try:
        return processor.prepare(converted)
    except (ValueError, TypeError) as error:  # e.g. an image of an aspect ratio beyond 200
        raise bad_request(error, param="messages") from error


def _part(part: ContentPart, where: str) -> dict[str, Any]:
    """One OpenAI content part -> the processor's, its image decoded (``where``: its path)."""
    if part.image_url is None:
        return {"type": "text", "text": part.text}
    try:
        image = decode_data_uri(part.image_url.url, max_pixels=MAX_IMAGE_PIXELS)
    except InvalidImage as error:
        raise APIError(
            400, str(error), code="invalid_image", param=f"{where}.image_url.url"
        ) from None
    return {"type": "image", "image": image}


def _sampling(body: ChatCompletionRequest) -> dict[str, Any]:
    """OpenAI's sampling fields -> the engine's: temperature 0 is greedy (top_k 1)."""
    if body.temperature == 0:
        return {"top_k": 1}
    return {
        "temperature": body.temperature,
        "top_k": body.top_k,
        "top_p": body.top_p,
        "seed": body.seed,
    }


class _Answer:
    """One answer in the making: its text stream, counts and stage timings."""

    def __init__(
        self,
        completion_id: str,
        body: ChatCompletionRequest,
        state: ServingState,
        metrics: ServerMetrics,
        prompt_length: int,
        start: float,
    ) -> None:
        self.id, self.body, self.metrics = completion_id, body, metrics
        self.model, self.created = state.model_name, int(time.time())
        self.stream = TextStream(state.pipeline.processor.tokenizer, state.pipeline.ar.config.llm)
        self.prompt_length, self.blocks = prompt_length, 0
        self.start = start

    async def next(self, outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
        """The request's next output, counted; engine errors and a shutdown's abort as APIError."""
        with engine_errors():
            output = await anext(outputs)
        if output.finish_reason == "aborted":
            raise shutting_down()  # only a shutdown aborts a request whose client is still here
        self.blocks += output.new_groups.shape[0]
        return output

    async def first(self, outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
        """The first output: the request was admitted (or refused: raised) and has its first block."""
        output = await self.next(outputs)
        now = time.perf_counter()
        self.metrics.observe("first_block", now - self.start)
        self.start = now
        return output

    def done(self) -> None:
        self.metrics.observe("decode", time.perf_counter() - self.start)

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_length,
            completion_tokens=self.blocks,
            total_tokens=self.prompt_length + self.blocks,
        )

    def chunk(self, delta: ChunkDelta, finish_reason: str | None = None) -> str:
        chunk = ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)],
        )
        return _event(chunk.model_dump_json())

    async def events(
        self, first: RequestOutput, outputs: AsyncIterator[RequestOutput]
    ) -> AsyncIterator[str]:
        """The SSE body: the role, one chunk per block that adds text, the finish reason, the usage
        (when asked), ``[DONE]``. An error after the start is sent as an ``{"error": ...}`` event."""
        async with aclosing(outputs):
            try:
                yield self.chunk(ChunkDelta(role="assistant", content=""))
                output = first
                while True:
                    text = self.stream.push(output.new_groups)
                    if text:
                        yield self.chunk(ChunkDelta(content=text))
                    if output.finished:
                        break
                    output = await self.next(outputs)
                self.done()
                text = self.stream.finish()
                if text:
                    yield self.chunk(ChunkDelta(content=text))
                yield self.chunk(ChunkDelta(), _FINISH_REASONS[output.finish_reason])
                if self.body.stream_options is not None and self.body.stream_options.include_usage:
                    usage = ChatCompletionChunk(
                        id=self.id,
                        created=self.created,
                        model=self.model,
                        choices=[],
                        usage=self.usage(),
                    )
                    yield _event(usage.model_dump_json())
            except APIError as error:
                self.metrics.record_error(error)
                yield _event(json.dumps(error.body()))
            except Exception:
                logger.exception("kelix_fast: a chat stream failed")
                error = APIError(500, "internal server error", code="internal_error")
                self.metrics.record_error(error)
                yield _event(json.dumps(error.body()))
            yield _event("[DONE]")


def _event(data: str) -> str:
    return f"data: {data}\n\n"
