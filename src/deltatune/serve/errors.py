"""The one error type the server's parts raise to answer a request with a 4xx/5xx status."""

from __future__ import annotations


class RequestError(Exception):
    """A request cannot be served; ``status`` is the HTTP status, ``detail`` says why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class QueueFull(RequestError):
    """The batcher's bounded queue has no room: the client should retry later (429)."""

    def __init__(self, size: int) -> None:
        super().__init__(429, f"the server is busy: {size} requests are already waiting; retry later")
