"""``BodySizeLimit``: refuse request bodies over a size with a 413 in OpenAI's error shape.

A declared ``Content-Length`` over the limit is refused before any byte is read; a body without one
(chunked) is counted as it arrives and refused once it passes the limit, so nothing larger than the
limit is ever buffered. The refusal is raised where the app reads the body, so it is answered (and
counted) by the app's error handlers like any other error. (FastAPI's own ``max_body_size`` answers
plain text when Content-Length is too large, which OpenAI clients cannot parse.)
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kelix_fast.serving.errors import APIError


class BodySizeLimit:
    """ASGI middleware: request bodies of at most ``max_bytes`` bytes."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        too_large = declared.isdigit() and int(declared) > self.max_bytes
        received = 0

        # Raised inside the app's body parsing, which passes HTTPExceptions on to the error handlers.
        async def limited() -> Message:
            nonlocal received
            if too_large:
                raise self._too_large()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, limited, send)

    def _too_large(self) -> APIError:
        return APIError(
            413,
            f"the request body exceeds the limit of {self.max_bytes} bytes",
            code="request_too_large",
        )
