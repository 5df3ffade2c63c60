"""OpenAI-compatible routes for causal LMs: ``POST /v1/completions``, ``POST /v1/chat/completions``
(the tokenizer's chat template) and ``GET /v1/models``. ``model`` names the adapter
(``"__base__"`` for the base model); ``"stream": true`` answers with server-sent events in
OpenAI's chunk format, ending with ``data: [DONE]``. Errors use OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``, so the official clients raise their usual
exceptions.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute

from deltatune.core.routing import BASE_ADAPTER
from deltatune.errors import DeltatuneError
from deltatune.serve.errors import RequestError
from deltatune.serve.generation import GenerationService
from deltatune.serve.openai_schemas import ChatRequest, CompletionRequest, SamplingRequest
from deltatune.serve.scheduler import Generation

log = logging.getLogger("deltatune.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 429: "rate_limit_error"}
CHAT_MAX_TOKENS = 256  #: a chat request's new tokens when it names no limit (completions: 16, as OpenAI)


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error object."""
    code = "model_not_found" if status == 404 else None
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


def _as_request_error(exc: Exception) -> RequestError:
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, DeltatuneError):
        return RequestError(400, str(exc))
    log.error("generation failed", exc_info=exc)
    return RequestError(500, "internal server error (details are in the server log)")


class OpenAIRoute(APIRoute):
    """A route whose errors, validation errors included, are answered in OpenAI's format."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as exc:
                first = exc.errors()[0] if exc.errors() else {}
                param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
                problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: {e.get('msg')}"
                                     for e in exc.errors())
                return JSONResponse(error_body(400, f"invalid request: {problems}", param), status_code=400)
            except Exception as exc:
                err = _as_request_error(exc)
                return JSONResponse(error_body(err.status, err.detail), status_code=err.status)

        return route


def openai_router(service: GenerationService) -> APIRouter:
    """The OpenAI-compatible routes over ``service``."""
    router = APIRouter(route_class=OpenAIRoute, tags=["openai"])
    engine = service.engine

    @router.get("/v1/models")
    async def models():
        """The base model (``"__base__"``) and every loaded adapter."""
        names = [BASE_ADAPTER, *sorted(engine.loaded)]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "deltatune"}
                                           for n in names]}

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest):
        """Continue ``prompt`` with adapter ``model``."""
        await service.ensure_adapter(body.model)
        prompt = service.encode(body.text)
        gen = service.submit(body.model, prompt, body.sampling())
        return await _answer(gen, body, "text_completion", "cmpl", _text_choice)

    @router.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        """Answer ``messages`` (through the tokenizer's chat template) with adapter ``model``."""
        await service.ensure_adapter(body.model)
        prompt = service.encode_chat([m.model_dump() for m in body.messages])
        gen = service.submit(body.model, prompt, body.sampling(CHAT_MAX_TOKENS))
        return await _answer(gen, body, "chat.completion", "chatcmpl", _chat_choice)

    return router


def _text_choice(text: str | None, finish: str | None, first: bool, stream: bool) -> dict:
    return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}


def _chat_choice(text: str | None, finish: str | None, first: bool, stream: bool) -> dict:
    if not stream:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}
    delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


async def _answer(gen: Generation, body: SamplingRequest, kind: str, prefix: str, choice: Callable):
    head = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": body.model}
    if body.stream:
        chunk_kind = kind + ".chunk" if kind.startswith("chat") else kind
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_events(gen, {**head, "object": chunk_kind}, choice, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    text = await gen.text()
    return {**head, "choices": [choice(text, gen.seq.finish_reason, False, False)], "usage": _usage(gen)}


async def _events(gen: Generation, head: dict, choice: Callable, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per text piece, the finish reason, usage if asked, [DONE].
    A client that goes away closes this generator, which cancels the request."""
    def event(data: dict) -> str:
        return f"data: {json.dumps(data)}\n\n"

    try:
        if head["object"].startswith("chat"):
            yield event({**head, "choices": [choice(None, None, True, True)]})
        async for piece in gen.pieces():
            yield event({**head, "choices": [choice(piece, None, False, True)]})
        yield event({**head, "choices": [choice(None, gen.seq.finish_reason, False, True)]})
        if include_usage:
            yield event({**head, "choices": [], "usage": _usage(gen)})
    except Exception as exc:  # the status line went out already: the error travels as an event
        err = _as_request_error(exc)
        yield event(error_body(err.status, err.detail))
    yield "data: [DONE]\n\n"


def _usage(gen: Generation) -> dict:
    prompt, completion = len(gen.seq.prompt), len(gen.seq.tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
