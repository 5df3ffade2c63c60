"""Hostile and careless requests against a real uvicorn on loopback (issue 16): no 500 for a bad
request, JSON answers that never echo the input, a body-size limit, and a queue deadline that
answers at once with Retry-After instead of letting a client wait."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from deltatune.serve import create_app
from tests.serve.conftest import TEXTS, LiveServer, served_model

TOKEN = "limits-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def admin_root(adapter_root, tmp_path_factory):
    """The shared adapters plus one whose config nests 100,000 levels deep."""
    import shutil
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(adapter_root / "a0", root / "a0")
    shutil.copytree(adapter_root / "a0", root / "deep")
    (root / "deep" / "adapter_config.json").write_text('{"r": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return root


@pytest.fixture(scope="module")
def server(adapter_root, admin_root, tokenizer):
    app = create_app(served_model(adapter_root, ["a0"]), tokenizer, adapter_root=admin_root, admin_token=TOKEN,
                     max_body_mb=0.25)
    with LiveServer(app) as live:
        yield live


def _is_clean_4xx(r: httpx.Response, status: int | tuple) -> None:
    assert r.status_code in ((status,) if isinstance(status, int) else status), (r.status_code, r.text[:300])
    assert r.headers["content-type"] == "application/json"
    assert "detail" in json.loads(r.content.decode("ascii"))  # always JSON, always ASCII
    assert len(r.content) < 8_000, f"a {len(r.content)}-byte error answer"


BAD_BODIES = {
    "lone-surrogate-text": b'{"adapter": "a0", "inputs": ["\\ud800"]}',
    "lone-surrogate-adapter": b'{"adapter": "\\udfff", "inputs": ["fine"]}',
    "lone-surrogate-key": b'{"adapter": "a0", "inputs": ["x"], "\\ud800": 1}',
    "nan-input": b'{"adapter": "a0", "inputs": [NaN]}',
    "infinity-input": b'{"adapter": "a0", "inputs": ["x", -Infinity]}',
    "nan-adapter": b'{"adapter": NaN, "inputs": ["x"]}',
    "deep-json": b'{"adapter": "a0", "inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "not-utf8": b'{"adapter": "a0", "inputs": ["\xff\xfe"]}',
    "not-json": b"{oops",
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_a_malformed_body_is_a_json_4xx_and_the_connection_stays_usable(server, reference, case):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/classify", content=BAD_BODIES[case], headers=JSON)
        _is_clean_4xx(r, (400, 404, 422))
        assert r.headers.get("connection") != "close"
        ok = c.post("/v1/classify", json={"adapter": "a0", "inputs": [TEXTS[0]]})  # same pooled connection
        assert ok.status_code == 200
        reference.check("a0", [TEXTS[0]], ok.json())


def test_a_422_never_echoes_a_big_input(server):
    huge = "y" * 200_000  # under the body limit, over the 20,000 characters a text may have
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/classify", json={"adapter": "a0", "inputs": [huge], huge[:50_000]: 1})
        _is_clean_4xx(r, 422)
        assert "yyyyyyyyyy" * 30 not in r.text


def test_a_body_over_the_limit_is_413_declared_or_streamed(server):
    body = json.dumps({"adapter": "a0", "inputs": ["z" * 1000] * 300}).encode()  # ~300 kB > 0.25 MB
    with httpx.Client(base_url=server.url, timeout=60) as c:
        _is_clean_4xx(c.post("/v1/classify", content=body, headers=JSON), 413)

        def chunks():  # no Content-Length: the limit is counted as the body arrives
            for i in range(0, len(body), 16_384):
                yield body[i:i + 16_384]
        _is_clean_4xx(c.post("/v1/classify", content=chunks(), headers=JSON), 413)
        assert c.get("/healthz").status_code == 200
        metrics = c.get("/metrics").json()
    assert "413" in json.dumps(metrics)


def test_admin_loads_of_a_long_path_or_a_deep_config_are_400(server):
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c:
        r = c.post("/v1/adapters", json={"name": "long", "path": "a" * 300})
        _is_clean_4xx(r, 400)
        r = c.post("/v1/adapters", json={"name": "long2", "path": "a0/" + "b" * 300 + "/c"})
        _is_clean_4xx(r, 400)
        r = c.post("/v1/adapters", json={"name": "deep", "path": "deep"})
        _is_clean_4xx(r, 400)
        assert "nests" in r.json()["detail"]
        assert [a["name"] for a in c.get("/v1/adapters").json()["adapters"]] == ["a0"]


def test_requests_queued_past_the_deadline_get_503_with_retry_after_at_once(adapter_root, tokenizer, reference):
    app = create_app(served_model(adapter_root, ["a0"]), tokenizer, max_batch=1, max_wait_ms=0, queue_size=4,
                     max_queue_ms=300)
    gate = threading.Event()
    body = {"adapter": "a0", "inputs": [TEXTS[2]]}

    async def burst(url: str):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            async def post():
                began = time.perf_counter()
                r = await c.post("/v1/classify", json=body)
                return r, time.perf_counter() - began
            posts = [asyncio.ensure_future(post()) for _ in range(8)]
            deadline = time.perf_counter() + 30
            while sum(p.done() for p in posts) < 7 and time.perf_counter() < deadline:
                await asyncio.sleep(0.02)  # all but the one the (held) model has must be answered
            gate.set()
            answers = await asyncio.gather(*posts)
            return answers, await c.post("/v1/classify", json=body)

    with LiveServer(app) as live:
        app.state.batcher._executor.submit(gate.wait)  # the model thread is busy, as with a long batch
        answers, after = asyncio.run(burst(live.url))
    statuses = sorted(r.status_code for r, _ in answers)
    # one reaches the (held) model; of the rest, those that fit the queue (4) are shed at the
    # deadline, the others find it full (one slot may free as the model takes the first request)
    assert statuses.count(200) == 1 and statuses.count(503) >= 3 and statuses.count(429) >= 3, statuses
    assert len(statuses) == 8
    for r, seconds in answers:
        if r.status_code == 200:
            reference.check("a0", [TEXTS[2]], r.json())
            continue
        _is_clean_4xx(r, (429, 503))
        assert int(r.headers["Retry-After"]) >= 1
        assert seconds < 5, f"a {r.status_code} took {seconds:.1f}s"
        if r.status_code == 503:
            assert seconds >= 0.25 and "max-queue-ms" in r.json()["detail"]
    assert after.status_code == 200
    reference.check("a0", [TEXTS[2]], after.json())
