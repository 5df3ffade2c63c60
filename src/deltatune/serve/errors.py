"""The one error type the server's parts raise to answer a request with a 4xx/5xx status."""

from __future__ import annotations

import math


class RequestError(Exception):
    """A request cannot be served; ``status`` is the HTTP status, ``detail`` says why,
    ``retry_after`` (seconds) when trying again later may work."""

    def __init__(self, status: int, detail: str, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


class QueueFull(RequestError):
    """The batcher's bounded queue has no room: the client should retry later (429)."""

    def __init__(self, size: int) -> None:
        super().__init__(429, f"the server is busy: {size} requests are already waiting; retry later", retry_after=1)


class QueueTimeout(RequestError):
    """A request waited longer than ``--max-queue-ms`` for the model: shed, so the client hears at
    once rather than after a long wait (503)."""

    def __init__(self, waited_ms: float) -> None:
        super().__init__(503, f"the server is overloaded: the request waited {waited_ms:.0f} ms in the queue "
                              f"(--max-queue-ms) without reaching the model; retry later",
                         retry_after=max(1, math.ceil(waited_ms / 1000)))
