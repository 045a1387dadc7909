"""``BearerAuth``: an API key, ``Authorization: Bearer <key>``, on every route but the open ones.

A middleware rather than a route dependency, so that an unauthenticated request is refused before its
body is read or parsed (a dependency runs after FastAPI has read the body).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from kelix_fast.serving.errors import APIError


class BearerAuth:
    """ASGI middleware: 401 unless the request carries ``api_key`` (paths in ``open_paths`` need
    none); ``on_error`` sees each refusal."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str,
        open_paths: frozenset[str],
        on_error: Callable[[APIError], None],
    ) -> None:
        self.app, self.open_paths, self.on_error = app, open_paths, on_error
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("authorization", "").encode()
        if not hmac.compare_digest(given, self._expected):  # constant time: no key prefix leaks
            error = APIError(
                401,
                "a valid API key is required: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
            error.headers = {"WWW-Authenticate": "Bearer"}
            self.on_error(error)
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)
