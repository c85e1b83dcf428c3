"""``GET /metrics``: the server's counters in the Prometheus text format (``prometheus_client``).

Each application has its own registry, so that several can live in one process.  An ASGI middleware
counts every request by endpoint (its route's path, ``other`` for none) and status and times it until
its response ends (a stream's last event); the engine reports the characters it hands out, and the
time from a request's submission to its first character.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match

# Statuses that mean "not now": the server is full, or the client asks too often.
REJECTED = (429, 503)
# Whole requests run from milliseconds (a refusal) to minutes (a long stream); a first character comes early.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
FIRST_CHARACTER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """The metrics of one application and its engine."""

    def __init__(self, engine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("charrnn_http_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=registry)
        self.latency = Histogram("charrnn_http_request_duration_seconds", "Seconds from a request's arrival to the "
                                 "end of its response, by endpoint", ["endpoint"], buckets=LATENCY_BUCKETS,
                                 registry=registry)
        self.rejected = Counter("charrnn_rejected_requests", "Requests refused because the server was full (503) "
                                "or asked to slow down (429)", ["endpoint", "status"], registry=registry)
        self.characters = Counter("charrnn_generated_characters", "Characters generated, over all samples",
                                  registry=registry)
        self.first_character = Histogram("charrnn_time_to_first_character_seconds", "Seconds from a request's "
                                         "submission to its first generated character",
                                         buckets=FIRST_CHARACTER_BUCKETS, registry=registry)
        gauges = {"charrnn_waiting_requests": ("Requests queued, not yet generating", lambda: len(engine.waiting)),
                  "charrnn_running_requests": ("Requests generating", lambda: len(engine.active)),
                  "charrnn_running_rows": ("Sample rows generating (a request has one per sample)",
                                           lambda: sum(job.num_samples for job in engine.active))}
        for name, (doc, read) in gauges.items():
            Gauge(name, doc, registry=registry).set_function(read)

    def pushed(self, job, pieces: list[str]) -> None:
        """The engine hands ``job`` its new text ``pieces`` (one per sample); called before the job has them."""
        count = sum(map(len, pieces))
        self.characters.inc(count)
        if count and not any(job.texts):
            self.first_character.observe(time.monotonic() - job.submitted)

    def answered(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if status in REJECTED:
            self.rejected.labels(endpoint, str(status)).inc()

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def endpoint_of(scope) -> str:
    """The path of the route that answers ``scope`` (also when only its method is wrong), or ``other``."""
    for route in scope["app"].routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            return route.path
    return "other"


class MetricsMiddleware:
    """Counts and times every HTTP request into ``metrics``; a request that raised counts as 500."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.answered(endpoint_of(scope), status, time.perf_counter() - start)
