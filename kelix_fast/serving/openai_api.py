"""``build_app``: the OpenAI-compatible HTTP API of one loaded :class:`~kelix_fast.KelixPipeline`.

    POST /v1/chat/completions   chat (text and data-URI images), plain or streamed (SSE)
    POST /v1/images/generations text to image, base64 PNGs
    GET  /v1/models             the served model
    GET  /health                200 while serving, 503 once draining (never needs the API key)
    GET  /metrics               Prometheus text format

Every chat and image request goes through one :class:`~kelix_fast.serving.async_engine.AsyncEngine`, so
they are decoded in the same continuous batch. The app is separate from loading the models
(:func:`kelix_fast.serving.server.build_pipeline`) and starts its engine at startup, so any ASGI host can
run it: ``kelix-fast serve`` runs it under uvicorn; a Ray Serve deployment can wrap
``serve.ingress(lambda: build_app(build_pipeline(...)))``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from kelix_fast.pipeline import KelixPipeline
from kelix_fast.serving.auth import BearerAuth
from kelix_fast.serving.body_limit import BodySizeLimit
from kelix_fast.serving.chat import create_chat_completion
from kelix_fast.serving.disconnect import ClientDisconnected
from kelix_fast.serving.errors import APIError, install_error_handlers
from kelix_fast.serving.lifecycle import AdmissionGate, ServingState
from kelix_fast.serving.metrics import RequestMetrics, ServerMetrics
from kelix_fast.serving.protocol import (
    MAX_BODY_BYTES,
    ChatCompletion,
    ChatCompletionRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
)
from kelix_fast.serving.text_to_image import create_images

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client left; it is never sent


def build_app(
    pipeline: KelixPipeline,
    *,
    model_name: str = "kelix",
    max_batch: int = 32,
    max_queue: int = 256,
    max_context: int | None = None,
    max_render_batch: int = 8,
    api_key: str | None = None,
    shutdown_timeout: float = 30.0,
) -> FastAPI:
    """The FastAPI app serving ``pipeline``.

    Args:
        pipeline: the loaded models; without a DiT and VAE the image route answers 400.
        model_name: the model id clients see and may send.
        max_batch: requests decoded together (the engine's decode slots).
        max_queue: requests that may wait for a slot; one more is answered 429 at once.
        max_context: positions per request (prompt + new blocks - 1), default the model's; the KV
            cache of ``max_batch x max_context`` positions is allocated here.
        max_render_batch: images the DiT renders together.
        api_key: when set, every route but ``/health`` needs ``Authorization: Bearer <api_key>``.
        shutdown_timeout: seconds the requests in flight get at shutdown before they are aborted.

    The app's ``state.serving`` is its :class:`~kelix_fast.serving.lifecycle.ServingState`.
    """
    metrics = ServerMetrics(lambda: state.stats())  # the state reports to the metrics they read
    state = ServingState(
        pipeline,
        model_name=model_name,
        max_batch=max_batch,
        max_queue=max_queue,
        max_context=max_context,
        max_render_batch=max_render_batch,
        on_stage=metrics.observe,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.start()
        yield
        await state.drain(shutdown_timeout)

    # No interactive docs: they would be routes outside the API key.
    app = FastAPI(
        title="kelix_fast", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.serving = state
    install_error_handlers(app, metrics.record_error)

    @app.exception_handler(ClientDisconnected)
    async def client_gone(_: Request, __: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    def check_model(model: str | None) -> None:
        if model is not None and model != model_name:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {model_name!r}",
                code="model_not_found",
                param="model",
            )

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request
    ) -> ChatCompletion | StreamingResponse:
        check_model(body.model)
        return await create_chat_completion(state, metrics, body, request)

    @app.post("/v1/images/generations")
    async def images_generations(body: ImageGenerationRequest, request: Request) -> ImagesResponse:
        check_model(body.model)
        return await create_images(state, metrics, body, request)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=state.created)])

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        # Reading the engine's stats waits for the current step: off the event loop.
        body = await asyncio.to_thread(metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    routes = frozenset(route.path for route in app.routes)
    # Outermost last: metrics see every answer, the gate counts what the drain waits for, the key
    # is checked before the body is read, the body limit applies while it is read.
    app.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)
    if api_key is not None:
        app.add_middleware(
            BearerAuth,
            api_key=api_key,
            open_paths=frozenset({"/health"}),
            on_error=metrics.record_error,
        )
    app.add_middleware(
        AdmissionGate,
        state=state,
        open_paths=frozenset({"/metrics"}),
        on_error=metrics.record_error,
    )
    app.add_middleware(RequestMetrics, metrics=metrics, routes=routes)
    return app
