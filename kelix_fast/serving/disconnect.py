"""Stopping a handler's work when its client goes away.

A non-streaming handler is never told that its client disconnected: without a watch it would run its
request to the end for nobody. :func:`cancel_on_disconnect` cancels the handler as soon as the server
reports the disconnect; the cancellation reaches the ``AsyncEngine.generate`` iterator the handler is
waiting on, which aborts its request and frees its slot. (A streaming response needs no watch: the
server cancels or closes its body generator, which closes the iterator the same way.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.requests import Request


class ClientDisconnected(Exception):
    """The client went away before its answer was ready."""


@asynccontextmanager
async def cancel_on_disconnect(request: Request) -> AsyncIterator[None]:
    """Run the body of the ``async with`` until the client disconnects; then cancel it and raise
    :class:`ClientDisconnected`. Enter it in the handler's own task, after the body has been read."""
    task = asyncio.current_task()
    assert task is not None  # inside a handler
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        # Once the body has been read, the server's next message is http.disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        disconnected = True
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    except asyncio.CancelledError:
        if not disconnected:
            raise  # cancelled for another reason (e.g. the server's shutdown timeout)
        task.uncancel()
        raise ClientDisconnected() from None
    finally:
        watcher.cancel()
