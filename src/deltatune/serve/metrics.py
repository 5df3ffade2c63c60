"""Request counters and latency percentiles for ``GET /metrics``, recorded by an ASGI middleware."""

from __future__ import annotations

import time
from collections import Counter, deque

#: routes reported by name; anything else is counted as "other" so odd paths cannot grow the table
ROUTES = ("/v1/classify", "/v1/generate", "/v1/adapters", "/healthz", "/metrics")


def route_of(path: str) -> str:
    """The route template a path belongs to (``/v1/adapters/{name}`` for any adapter name)."""
    if path.startswith("/v1/adapters/"):
        return "/v1/adapters/{name}"
    return path if path in ROUTES else "other"


def percentiles(values, points=(50, 90, 99)) -> dict[str, float]:
    """Nearest-rank percentiles of ``values`` (empty: no keys)."""
    ordered = sorted(values)
    if not ordered:
        return {}
    return {f"p{p}": ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))] for p in points}


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
            self.metrics.observe(scope["method"], route_of(scope["path"]), status, time.perf_counter() - start)
