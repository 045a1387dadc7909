"""The shared live server of the HTTP tests (tests/serving/live_server.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory):
    """The shared server: 16 decode slots, 64 waiting requests, no API key."""
    from tests.serving.live_server import LiveServer  # needs the serve extra: only when used

    live = LiveServer(
        tmp_path_factory.mktemp("server") / "server.log", "--max-batch", "16", "--max-queue", "64"
    )
    yield live
    live.stop_cleanly()
