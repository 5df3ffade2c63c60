"""What keeps a hostile or careless request from hurting the server: a request-body size limit
(413), error answers that always render (JSON, ASCII-escaped, never echoing the input back) and
never turn a bad request into a 500, and ``Retry-After`` on the answers that shed load (429, 503).

    install(app, settings)   # once, in create_app
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from deltatune.serve.errors import RequestError
from deltatune.serve.settings import ServeSettings

log = logging.getLogger("deltatune.serve")

#: validation problems listed in a 422 (a body can have thousands); the rest are counted
MAX_LISTED_ERRORS = 20
#: characters of a location part or message kept in an error answer
MAX_ERROR_CHARS = 200


class SafeJSONResponse(Response):
    """JSON that always encodes: non-ASCII (lone surrogates included) escaped, NaN refused."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(status: int, detail: Any, headers: dict[str, str] | None = None) -> SafeJSONResponse:
    return SafeJSONResponse({"detail": detail}, status_code=status, headers=headers)


def _cut(value: Any, limit: int = MAX_ERROR_CHARS) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def validation_detail(errors: list[dict]) -> list[dict]:
    """Pydantic's problems without the ``input`` they quote (it may be 100 MB, or not encodable)."""
    listed = [{"loc": [_cut(part) for part in e.get("loc", ())][:10], "msg": _cut(e.get("msg", "")),
               "type": _cut(e.get("type", ""))} for e in errors[:MAX_LISTED_ERRORS]]
    if len(errors) > MAX_LISTED_ERRORS:
        listed.append({"loc": [], "msg": f"... and {len(errors) - MAX_LISTED_ERRORS} more problems", "type": "more"})
    return listed


class BodyTooLarge(HTTPException):
    """The request body is larger than ``--max-body-mb`` (413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes (--max-body-mb); send less")


class BodySizeLimit:
    """ASGI middleware: a 413 for a body over ``max_bytes``, refused on its declared length before
    it is read, or as soon as a streamed body passes the limit."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.max_bytes <= 0:
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await error_response(413, BodyTooLarge(self.max_bytes).detail)(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)  # an HTTPException: routes answer it with a 413
            return message

        async def tracked_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await error_response(413, exc.detail)(scope, receive, send)


def install(app: FastAPI, settings: ServeSettings) -> None:
    """Add the body-size limit and the error handlers to ``app``."""
    app.add_middleware(BodySizeLimit, max_bytes=int(settings.max_body_mb * 2**20))

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        return error_response(exc.status, _cut(exc.detail, 2000), headers or None)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> Response:
        return error_response(422, validation_detail(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        return error_response(exc.status_code, _cut(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        log.error("request failed", exc_info=exc)
        return error_response(500, "internal server error (details are in the server log)")
