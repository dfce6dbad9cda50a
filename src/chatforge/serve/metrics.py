"""Prometheus metrics for GET /metrics: requests, tokens, queue depth, latency histograms.

Each app owns its registry (no process-global state), so tests can run several servers in one
process. HTTP status and latency are measured by a plain ASGI middleware at the moment the last
byte of a response (or of a stream) is sent.
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the route)

# Buckets from 5 ms to 5 min: TTFT on a busy CPU server can be many seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("chatforge_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("chatforge_request_latency_seconds", "Time to the last byte of the response", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("chatforge_time_to_first_token_seconds", "Time from request to the first generated token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("chatforge_tokens", "Tokens processed", ["model", "kind"], registry=r)
        self.rejected = Counter("chatforge_rejected_requests", "Requests refused by admission control", ["reason"], registry=r)
        self.cancelled = Counter("chatforge_cancelled_requests", "Generations cancelled because the client went away", ["model"], registry=r)
        self.queue_depth = Gauge("chatforge_queue_depth", "Requests waiting for an engine slot", ["model"], registry=r)
        self.active_slots = Gauge("chatforge_active_slots", "Requests being generated", ["model"], registry=r)
        self.prefix_hits = Gauge("chatforge_prefix_cache_hit_tokens", "Prompt tokens taken from the prefix cache instead of computed, since start",
                                 ["model"], registry=r)

    def track_engine(self, model: str, queue_depth: Callable[[], float], active_slots: Callable[[], float],
                     prefix_hits: Callable[[], float] = lambda: 0.0) -> None:
        """Gauges read at scrape time from the engine loop."""
        self.queue_depth.labels(model).set_function(queue_depth)
        self.active_slots.labels(model).set_function(active_slots)
        self.prefix_hits.labels(model).set_function(prefix_hits)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP request by route template and status, timing it to its last byte."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._observe(scope, status["code"], t0)
                status["done"] = True

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if not status.get("done"):  # the client left mid-response, or the app failed
                self._observe(scope, 499 if status["code"] == 200 else status["code"], t0)

    def _observe(self, scope, code: int, t0: float) -> None:
        route = scope.get("route")
        name = getattr(route, "path", None) or "unmatched"
        self.metrics.requests.labels(name, str(code)).inc()
        self.metrics.latency.labels(name).observe(time.perf_counter() - t0)
