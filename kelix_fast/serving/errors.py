"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the right status.

:class:`APIError` is what the routes (and the body-size middleware) raise; it is an ``HTTPException``
so that FastAPI lets it through its body parsing. :func:`install_error_handlers` turns it, request
validation errors, the router's 404/405 and any other exception into that shape; the last one is a 500
whose message says nothing about the internals (the ASGI server logs its traceback).
:func:`engine_errors` maps the engine's exceptions to statuses in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kelix_fast.serving.async_engine import EngineOverloaded, EngineStopped, RequestFailed

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1  # a full queue or a failed step: the next try may well succeed at once
SHUTDOWN_RETRY_AFTER_SECONDS = 10  # this server is going away: try another one, or this one later

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(HTTPException):
    """An error answered to the client as it is: ``status``, ``message`` and OpenAI's ``type``
    (derived from the status), ``code`` and ``param``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        headers = None if retry_after is None else {"Retry-After": str(retry_after)}
        super().__init__(status_code=status, detail=message, headers=headers)
        self.type = _TYPES.get(status, "server_error")
        self.code, self.param = code, param

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.detail,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def shutting_down() -> APIError:
    return APIError(
        503,
        "the server is shutting down and admits no new requests",
        code="shutting_down",
        retry_after=SHUTDOWN_RETRY_AFTER_SECONDS,
    )


def bad_request(error: Exception, *, param: str | None = None) -> APIError:
    """A 400 carrying the message of a ValueError/TypeError that the engine or processor raised
    about the request's own content (they name the argument and the expected value)."""
    return APIError(400, str(error), code="invalid_value", param=param)


@contextmanager
def engine_errors() -> Iterator[None]:
    """Map the AsyncEngine's exceptions raised inside to their HTTP errors: a full queue 429, a
    stopped engine 503, a failed step 503 (only this request's; the cause's type is named, its message
    may hold internals and is logged instead), a request the engine refuses (too long for the
    context, bad sampling values) 400."""
    try:
        yield
    except EngineOverloaded as error:
        raise APIError(
            429, str(error), code="queue_full", retry_after=RETRY_AFTER_SECONDS
        ) from error
    except EngineStopped as error:
        raise shutting_down() from error
    except RequestFailed as error:
        logger.error("kelix_fast: %s", error)
        cause = type(error.__cause__).__name__ if error.__cause__ is not None else "an error"
        raise APIError(
            503,
            f"the engine step that held this request failed ({cause}); other requests were not "
            "affected, retry later",
            code="request_failed",
            retry_after=RETRY_AFTER_SECONDS,
        ) from error
    except (ValueError, TypeError) as error:
        raise bad_request(error) from error


def install_error_handlers(app: FastAPI, on_error: Callable[[APIError], None]) -> None:
    """Answer every error of ``app`` in OpenAI's shape; ``on_error`` sees each one (for metrics)."""

    def answer(error: APIError) -> JSONResponse:
        on_error(error)
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        if isinstance(error, APIError):
            return answer(error)
        # FastAPI's own: a body its JSON parser refused (400: invalid UTF-8, nesting too deep), no
        # route (404), no such method on it (405).
        where = f"{request.method} {request.url.path}"
        if error.status_code == 400:
            api_error = APIError(400, "the request body is not valid JSON", code="invalid_json")
        elif error.status_code == 404:
            api_error = APIError(404, f"Invalid URL ({where})")
        else:
            api_error = APIError(error.status_code, f"{error.detail} ({where})")
        api_error.headers = error.headers  # 405 names the allowed methods
        return answer(api_error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        return answer(_validation_error(error.errors()))

    # Starlette re-raises the exception after this answer, so the ASGI server logs its traceback.
    @app.exception_handler(Exception)
    async def internal_error(_: Request, __: Exception) -> JSONResponse:
        return answer(APIError(500, "internal server error", code="internal_error"))


def _validation_error(errors: list[dict[str, Any]]) -> APIError:
    """The most specific pydantic error as one 400: the deepest location (a union reports every
    member's error; the deepest is the member that matched the input's shape)."""
    error = max(errors, key=lambda e: len(e["loc"]))
    kind = error["type"]
    param = _param(error["loc"])
    if kind == "json_invalid":
        return APIError(
            400, f"the request body is not valid JSON: {error['msg']}", code="invalid_json"
        )
    if param is None:  # the body as a whole: not a JSON object, or not sent as JSON
        return APIError(
            400,
            "the request body must be a JSON object sent with Content-Type: application/json",
            code="invalid_body",
        )
    if kind == "extra_forbidden":
        return APIError(400, f"unknown field {param!r}", code="unknown_field", param=param)
    if kind == "missing":
        return APIError(400, f"missing field {param!r}", code="missing_field", param=param)
    code = "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"
    message = error["msg"].removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}", code=code, param=param)


def _param(loc: tuple[str | int, ...]) -> str | None:
    """pydantic's location -> the request's path, ``messages[0].content[1].text``. The first entry
    is FastAPI's ``"body"``; entries with brackets (``list[ContentPart]``) and ``str`` name union
    members, not fields."""
    path = ""
    for part in loc[1:]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" not in part and part != "str":
            path += f".{part}" if path else part
    return path or None
