"""Request counters and latency percentiles for ``GET /metrics``, recorded by an ASGI middleware."""

from __future__ import annotations

import math
import time
from collections import Counter, deque

from fastapi.routing import APIRoute
from starlette.routing import Match

#: HTTP's methods (RFC 9110, and PATCH); the server accepts any token as a method
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


def method_of(scope) -> str:
    """The request's method, or "other" for a token outside HTTP's, so clients cannot grow the table."""
    return scope["method"] if scope["method"] in HTTP_METHODS else "other"


def route_of(scope) -> str:
    """The template of the API route that serves request ``scope`` (``/v1/adapters/{name}`` for any
    name), read from the app's own routes (Starlette puts the app in the scope); "other" for paths
    that no API route serves, so odd paths cannot grow the table."""
    for route in scope["app"].routes:
        if isinstance(route, APIRoute) and route.matches(scope)[0] is not Match.NONE:
            return route.path
    return "other"


def percentiles(values, points=(50, 90, 99)) -> dict[str, float]:
    """Nearest-rank percentiles of ``values`` (empty: no keys): the ``p``-th is the smallest value
    that at least ``p`` percent of the values do not exceed."""
    ordered = sorted(values)
    if not ordered:
        return {}
    return {f"p{p}": ordered[max(1, math.ceil(p * len(ordered) / 100)) - 1] for p in points}


class Metrics:
    """Counts requests per route and status and keeps the latest ``window`` latencies per route."""

    def __init__(self, window: int = 10_000) -> None:
        self.window = window
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.latency_ms: dict[str, deque] = {}
        self.started = time.time()

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests[(method, route, status)] += 1
        self.latency_ms.setdefault(f"{method} {route}", deque(maxlen=self.window)).append(seconds * 1000)

    def snapshot(self) -> dict:
        """Requests by route and status, and latency percentiles (ms) over the window."""
        by_route: dict[str, dict[str, int]] = {}
        for (method, route, status), n in sorted(self.requests.items()):
            by_route.setdefault(f"{method} {route}", {})[str(status)] = n
        return {
            "uptime_s": round(time.time() - self.started, 3),
            "requests_total": sum(self.requests.values()),
            "requests": by_route,
            "latency_ms": {k: {"count": len(v), **{p: round(x, 3) for p, x in percentiles(v).items()}}
                           for k, v in sorted(self.latency_ms.items())},
        }


class MetricsMiddleware:
    """Pure ASGI middleware: times every HTTP request and records its final status."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500  # if the app fails before it answers

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.observe(method_of(scope), route_of(scope), status, time.perf_counter() - start)
