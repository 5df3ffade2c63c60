"""The HTTP API: a FastAPI app serving one base model and many adapters, batched across adapters.

    app = create_app(model, tokenizer, adapter_root="adapters/", max_batch=32)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: ``POST /v1/classify``, ``POST /v1/generate``, ``GET /v1/adapters``, admin
``POST /v1/adapters`` and ``DELETE /v1/adapters/{name}`` (``Authorization: Bearer <token>``),
``GET /healthz``, ``GET /metrics``; OpenAPI docs at ``/docs``. Causal LMs also get the
OpenAI-compatible ``POST /v1/completions``, ``POST /v1/chat/completions`` and ``GET /v1/models``,
generated with continuous batching across adapters.
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Awaitable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from torch import nn

from deltatune.core.model import AdaptedModel
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.serve import limits, schemas
from deltatune.serve.batcher import Batcher
from deltatune.serve.engine import CLASSIFY, GENERATE, Engine
from deltatune.serve.errors import RequestError
from deltatune.serve.generation import GenerationService, load_from_root
from deltatune.serve.generation_metrics import wants_prometheus
from deltatune.serve.metrics import Metrics, MetricsMiddleware, percentiles
from deltatune.serve.openai_api import openai_router
from deltatune.serve.security import TOKEN_ENV, check_admin_token
from deltatune.serve.settings import ServeSettings

log = logging.getLogger("deltatune.serve")


_ERRORS = {code: {"model": schemas.Error} for code in (400, 401, 403, 404, 409, 413, 422, 429, 503)}


def create_app(model: nn.Module, tokenizer, settings: ServeSettings | None = None, **overrides) -> FastAPI:
    """A FastAPI app serving ``model`` (an :class:`AdaptedModel`, or a plain model to serve its
    base only) with ``tokenizer``. The adapters already loaded on ``model`` are pinned.
    Settings are ``settings`` with ``overrides`` (any :class:`ServeSettings` field) applied."""
    settings = replace(settings or ServeSettings(), **overrides)
    token = settings.admin_token if settings.admin_token is not None else os.environ.get(TOKEN_ENV)
    root = Path(settings.adapter_root).resolve() if settings.adapter_root is not None else None
    if settings.load_on_demand and root is None:
        raise ConfigError("load_on_demand (--load-on-demand) needs adapter_root (--adapter-root DIR) to load from")
    if not isinstance(model, AdaptedModel):
        model = AdaptedModel(model)
    engine = Engine(model, tokenizer, max_adapters=settings.max_adapters, max_length=settings.max_length,
                    precision=settings.precision)
    batcher = Batcher(engine.classify, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                      queue_size=settings.queue_size, max_queue_ms=settings.max_queue_ms)
    metrics = Metrics()
    generation = GenerationService(engine, batcher, settings, root) if engine.kind == GENERATE else None

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await batcher.start()
        if generation is not None:
            await generation.start()
        try:
            yield
        finally:
            if generation is not None:
                await generation.stop()
            await batcher.stop()

    from deltatune.version import __version__
    app = FastAPI(title="deltatune", version=__version__, lifespan=lifespan,
                  description="One base model, many adapters: requests for different adapters share a batch.")
    limits.install(app, settings)  # body-size limit and error answers that never fail
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last: outermost, it counts the 413s too
    app.state.engine, app.state.batcher, app.state.metrics, app.state.settings = engine, batcher, metrics, settings
    app.state.generation = generation
    if generation is not None:
        app.include_router(openai_router(generation))

    bearer = HTTPBearer(auto_error=False, description=f"the token in {TOKEN_ENV}")

    def admin(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        check_admin_token(credentials.credentials if credentials else None, token)

    # --- inference --------------------------------------------------------------------------
    @app.post("/v1/classify", response_model=schemas.ClassifyResponse, responses=_ERRORS, tags=["inference"])
    async def classify(body: schemas.ClassifyRequest):
        """Classify ``inputs`` with ``adapter``; concurrent requests share one mixed-adapter batch."""
        if engine.kind != CLASSIFY:
            raise RequestError(400, "this server's model is a causal LM: use /v1/generate")
        engine.check_adapter(body.adapter)
        outputs = await _answer(batcher.submit(body.adapter, body.inputs))
        return {"adapter": body.adapter, "outputs": outputs}

    @app.post("/v1/generate", response_model=schemas.GenerateResponse, responses=_ERRORS, tags=["inference"])
    async def generate(body: schemas.GenerateRequest):
        """Greedy continuation of ``prompt`` with ``adapter`` (one request per model call)."""
        if engine.kind != GENERATE:
            raise RequestError(400, "this server's model is a sequence classifier: use /v1/classify")
        engine.check_adapter(body.adapter)
        result = await _answer(batcher.call(lambda: engine.generate(body.adapter, body.prompt, body.max_new_tokens)))
        return {"adapter": body.adapter, **result}

    # --- adapters ---------------------------------------------------------------------------
    @app.get("/v1/adapters", response_model=schemas.AdapterList, tags=["adapters"])
    async def list_adapters():
        """The adapters loaded now."""
        return {"adapters": engine.describe(), "max_adapters": engine.cache.capacity}

    @app.post("/v1/adapters", status_code=201, response_model=schemas.LoadResponse, responses=_ERRORS,
              dependencies=[Depends(admin)], tags=["admin"])
    async def load_adapter(body: schemas.LoadRequest):
        """Load the adapter folder ``path`` (relative to ``--adapter-root``) as ``name``."""
        evicted = await _answer(batcher.call(lambda: load_from_root(engine, root, body.name, body.path), bounded=False))
        return {"loaded": body.name, "evicted": evicted}

    @app.delete("/v1/adapters/{name}", responses=_ERRORS, dependencies=[Depends(admin)], tags=["admin"])
    async def unload_adapter(name: str):
        """Unload adapter ``name``; requests for it that are still queued get a 404."""
        await _answer(batcher.call(lambda: engine.remove(name), bounded=False))
        return {"removed": name}

    # --- operations -------------------------------------------------------------------------
    @app.get("/healthz", tags=["operations"])
    async def healthz():
        """200 while the model worker runs, else 503."""
        ok = batcher.running
        body = {"status": "ok" if ok else "stopped", "adapters": len(engine.loaded), "queue_depth": batcher.depth}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["operations"])
    async def get_metrics(request: Request):
        """Requests by route and status, latency percentiles (ms), batch sizes, adapters loaded and evicted;
        with ``Accept: text/plain`` (Prometheus) generation metrics per adapter in the Prometheus text format."""
        if generation is not None and wants_prometheus(request.headers.get("accept")):
            return Response(generation.metrics.render(), media_type=generation.metrics.content_type)
        stats = batcher.stats
        sizes = list(stats.sizes)
        return {
            **metrics.snapshot(),
            "batches": {
                "count": stats.batches, "rows": stats.rows, "requests": stats.requests,
                "mean_rows": round(stats.rows / stats.batches, 3) if stats.batches else 0.0,
                "rows_percentiles": percentiles(sizes),
                "rows_histogram": _histogram(sizes),
                "mean_adapters": round(stats.adapter_groups / stats.batches, 3) if stats.batches else 0.0,
            },
            "adapters_loaded": len(engine.loaded),
            "adapters_evicted": engine.cache.evictions,
            "queue_depth": batcher.depth,
            "queue_size": batcher.queue_size,
        }

    return app


async def _answer(work: Awaitable):
    """Await model work; errors become a 4xx with their message, or a 500 that hides internals."""
    try:
        return await work
    except RequestError:
        raise
    except DeltatuneError as exc:
        raise RequestError(400, str(exc)) from None
    except Exception:
        log.exception("request failed")
        raise RequestError(500, "internal server error (details are in the server log)") from None


def _histogram(sizes: list[int]) -> dict[str, int]:
    """Batch sizes in power-of-two buckets: ``{"1": n, "2": n, "3-4": n, "5-8": n, ...}``."""
    buckets: dict[str, int] = {}
    for size in sizes:
        upper = 1
        while upper < size:
            upper *= 2
        label = str(upper) if upper <= 2 else f"{upper // 2 + 1}-{upper}"
        buckets[label] = buckets.get(label, 0) + 1
    return dict(sorted(buckets.items(), key=lambda kv: int(kv[0].split("-")[-1])))
