"""The server's Prometheus metrics (``GET /metrics``), in a registry per app, so that several apps in one
process (tests, Ray Serve replicas) never share or collide on a metric.

    kelix_requests_total{route, status}      HTTP requests answered (route "other" for unknown paths)
    kelix_errors_total{type, code}           errors answered, by OpenAI error type and code
    kelix_stage_seconds{stage}               time per stage of a request (histogram): preprocess,
                                             first_block (queue + prefill), decode, dit, vae, png
    kelix_queue_length                       requests waiting for a decode slot
    kelix_running_requests                   requests in the running batch
    kelix_kv_usage                           fraction of the KV cache positions reserved
    kelix_render_queue_length                images waiting for the DiT
    kelix_blocks_total                       blocks generated (rate() of it: blocks/s)
    kelix_step_seconds_total                 time spent in engine steps
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kelix_fast.serving.errors import APIError

STAGES = ("preprocess", "first_block", "decode", "dit", "vae", "png")
_STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    """The metrics of one app. ``stats()`` returns the live engine figures (``AsyncEngine.stats()``
    plus ``render_queue``), or None before the engine has started."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kelix_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "kelix_errors",
            "errors answered, by OpenAI error type and code",
            ["type", "code"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "kelix_stage_seconds",
            "seconds per stage of a request",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(stats))

    def record_error(self, error: APIError) -> None:
        self.errors.labels(error.type, error.code or "none").inc()

    def observe(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(seconds)

    def exposition(self) -> bytes:
        """The text format (reads the engine's stats: takes the engine lock briefly)."""
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """The engine's figures, read at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        if stats is None:
            return
        gauges = (
            ("kelix_queue_length", "requests waiting for a decode slot", "waiting"),
            ("kelix_running_requests", "requests in the running batch", "running"),
            ("kelix_kv_usage", "fraction of the KV cache positions reserved", "kv_usage"),
            ("kelix_render_queue_length", "images waiting for the DiT", "render_queue"),
        )
        for name, documentation, key in gauges:
            yield GaugeMetricFamily(name, documentation, value=stats[key])
        yield CounterMetricFamily("kelix_blocks", "blocks generated", value=stats["blocks"])
        yield CounterMetricFamily(
            "kelix_step_seconds", "seconds spent in engine steps", value=stats["step_seconds"]
        )


class RequestMetrics:
    """ASGI middleware counting answered requests by route and status. ``routes``: the app's paths;
    any other path is counted as ``"other"``, so clients cannot grow the label set."""

    def __init__(self, app: ASGIApp, *, metrics: ServerMetrics, routes: frozenset[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = 500  # if the app raises before it answers

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
