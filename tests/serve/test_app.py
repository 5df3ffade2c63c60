"""The HTTP API in-process (httpx over ASGI, FastAPI's TestClient): answers against the library's
own outputs, bad input, admin auth and path checks, the LRU, a full queue, failures."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading

import pytest
from fastapi.testclient import TestClient

import deltatune as dt
from deltatune.serve import create_app
from tests.serve.conftest import NAMES, TEXTS, asgi_client, run, served_model, tiny_bert, tiny_gpt2

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def make_app(adapter_root, tokenizer):
    def make(names=NAMES, **settings):
        settings = {"adapter_root": adapter_root, "admin_token": TOKEN, **settings}
        return create_app(served_model(adapter_root, names), tokenizer, **settings)
    return make


@pytest.fixture
def client(make_app):
    with TestClient(make_app(), raise_server_exceptions=False) as c:
        yield c


def loaded(client) -> list[str]:
    return [a["name"] for a in client.get("/v1/adapters").json()["adapters"]]


# --- answers ------------------------------------------------------------------------------------

def test_classify_equals_the_library_for_every_adapter_and_the_base(client, reference):
    for name in [*NAMES, dt.BASE_ADAPTER]:
        texts = TEXTS[:3]
        r = client.post("/v1/classify", json={"adapter": name, "inputs": texts})
        assert r.status_code == 200, r.text
        reference.check(name, texts, r.json())


def test_concurrent_requests_for_eight_adapters_form_one_mixed_batch(make_app, reference):
    app = make_app(max_batch=16, max_wait_ms=60_000)  # the batch closes when its 16 rows are there

    async def main():
        async with asgi_client(app) as c:
            jobs = [(NAMES[i % 8], [TEXTS[i], TEXTS[(i + 5) % 12]]) for i in range(8)]
            answers = await asyncio.gather(*(c.post("/v1/classify", json={"adapter": a, "inputs": t})
                                             for a, t in jobs))
            return jobs, answers, (await c.get("/metrics")).json()

    jobs, answers, metrics = run(main())
    for (adapter, texts), r in zip(jobs, answers):
        assert r.status_code == 200
        reference.check(adapter, texts, r.json())
    stats = app.state.batcher.stats
    assert (stats.batches, stats.rows, stats.adapter_groups) == (1, 16, 8)
    assert metrics["batches"]["count"] == 1 and metrics["batches"]["mean_adapters"] == 8
    assert metrics["requests"]["POST /v1/classify"] == {"200": 8}


def test_generate_equals_the_library_for_adapters_and_the_base(adapter_root, tokenizer):
    model = dt.AdaptedModel(tiny_gpt2())
    for name in ["g0", "g1"]:
        model.load(str(adapter_root / "gpt" / name), name)
    reference = dt.AdaptedModel(tiny_gpt2())
    for name in ["g0", "g1"]:
        reference.load(str(adapter_root / "gpt" / name), name)
    prompt = "the quick brown fox"
    enc = tokenizer([prompt], return_tensors="pt", return_token_type_ids=False)
    with TestClient(create_app(model, tokenizer), raise_server_exceptions=False) as c:
        texts = set()
        for name in ["g0", "g1", dt.BASE_ADAPTER]:
            r = c.post("/v1/generate", json={"adapter": name, "prompt": prompt, "max_new_tokens": 6})
            assert r.status_code == 200, r.text
            if name == dt.BASE_ADAPTER:
                with reference.disabled():
                    out = reference.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0)
            else:
                reference.use(name)
                out = reference.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0)
            new = out[0, enc["input_ids"].shape[1]:].tolist()
            assert r.json() == {"adapter": name, "tokens": new, "text": tokenizer.decode(new, skip_special_tokens=True)}
            texts.add(tuple(new))
        assert len(texts) == 3  # the adapters really change the continuation
        r = c.post("/v1/classify", json={"adapter": "g0", "inputs": ["x"]})
        assert r.status_code == 400 and "/v1/generate" in r.json()["detail"]
        r = c.post("/v1/generate", json={"adapter": "g0", "prompt": "x", "max_new_tokens": 0})
        assert r.status_code == 422
        r = c.post("/v1/generate", json={"adapter": "nope", "prompt": "x"})
        assert r.status_code == 404


def test_generate_on_a_classifier_is_a_clear_400(client):
    r = client.post("/v1/generate", json={"adapter": "a0", "prompt": "hello"})
    assert r.status_code == 400 and "/v1/classify" in r.json()["detail"]


# --- bad input ------------------------------------------------------------------------------------

def test_unknown_adapter_is_404_naming_it_and_the_loaded_ones(client):
    r = client.post("/v1/classify", json={"adapter": "nope", "inputs": ["hi"]})
    assert r.status_code == 404
    assert "unknown adapter 'nope'" in r.json()["detail"] and "a0" in r.json()["detail"]


@pytest.mark.parametrize("body", [
    b"{not json", b"", b"[1, 2]", b'{"adapter": "a0"}', b'{"inputs": ["x"]}', b'{"adapter": "a0", "inputs": []}',
    b'{"adapter": "a0", "inputs": "just a string"}', b'{"adapter": "a0", "inputs": [1, 2]}',
    b'{"adapter": "a0", "inputs": ["x"], "extra": 1}', b'{"adapter": "", "inputs": ["x"]}',
])
def test_malformed_requests_get_422_with_a_message(client, body):
    r = client.post("/v1/classify", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["detail"] and all("msg" in d for d in r.json()["detail"])


def test_too_many_inputs_is_422(client):
    r = client.post("/v1/classify", json={"adapter": "a0", "inputs": ["x"] * 65})
    assert r.status_code == 422 and "64" in str(r.json()["detail"])


# --- admin ------------------------------------------------------------------------------------------

def test_admin_routes_need_the_token(client):
    body = {"name": "extra", "path": "a1"}
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}]:
        assert client.post("/v1/adapters", json=body, headers=headers).status_code == 401
        r = client.delete("/v1/adapters/a0", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert loaded(client) == NAMES
    r = client.post("/v1/adapters", json=body, headers=AUTH)
    assert r.status_code == 201 and r.json() == {"loaded": "extra", "evicted": []}
    assert client.delete("/v1/adapters/a0", headers=AUTH).json() == {"removed": "a0"}
    assert loaded(client) == sorted([*NAMES[1:], "extra"])


def test_admin_routes_are_off_without_a_configured_token(make_app, monkeypatch):
    monkeypatch.delenv("DELTATUNE_ADMIN_TOKEN", raising=False)
    with TestClient(make_app(admin_token=None)) as c:
        r = c.post("/v1/adapters", json={"name": "x", "path": "a1"}, headers=AUTH)
        assert r.status_code == 403 and "DELTATUNE_ADMIN_TOKEN" in r.json()["detail"]
    monkeypatch.setenv("DELTATUNE_ADMIN_TOKEN", "from-env")
    with TestClient(make_app(admin_token=None)) as c:
        r = c.post("/v1/adapters", json={"name": "x", "path": "a1"}, headers={"Authorization": "Bearer from-env"})
        assert r.status_code == 201


def test_hot_loaded_adapter_answers_like_the_library_and_unloading_makes_it_404(make_app, reference):
    with TestClient(make_app(names=["a0"])) as c:
        assert c.post("/v1/classify", json={"adapter": "a3", "inputs": ["hi"]}).status_code == 404
        assert c.post("/v1/adapters", json={"name": "a3", "path": "a3"}, headers=AUTH).status_code == 201
        r = c.post("/v1/classify", json={"adapter": "a3", "inputs": TEXTS[:4]})
        reference.check("a3", TEXTS[:4], r.json())
        r = c.post("/v1/adapters", json={"name": "a3", "path": "a4"}, headers=AUTH)
        assert r.status_code == 409 and "loaded already" in r.json()["detail"]
        assert c.delete("/v1/adapters/a3", headers=AUTH).status_code == 200
        assert c.post("/v1/classify", json={"adapter": "a3", "inputs": ["hi"]}).status_code == 404
        r = c.delete("/v1/adapters/a3", headers=AUTH)
        assert r.status_code == 404 and "not loaded" in r.json()["detail"]


def test_paths_outside_the_root_are_refused_and_nothing_is_loaded(make_app, adapter_root, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(adapter_root / "a1", outside)
    root = tmp_path / "root"
    shutil.copytree(adapter_root / "a2", root / "ok")
    os.symlink(outside, root / "link")
    shutil.copytree(adapter_root / "a2", root / "sneaky")
    (root / "sneaky" / "adapter_model.safetensors").unlink()
    os.symlink(outside / "adapter_model.safetensors", root / "sneaky" / "adapter_model.safetensors")
    with TestClient(make_app(names=["a0"], adapter_root=root)) as c:
        for path in ["../outside", "ok/../../outside", str(outside), "/etc", "link", "sneaky", "missing", ".."]:
            r = c.post("/v1/adapters", json={"name": "x", "path": path}, headers=AUTH)
            assert 400 <= r.status_code < 500, path
            assert str(root.resolve()) not in r.json()["detail"]  # the server never shows its own root
            assert loaded(c) == ["a0"]
        assert c.post("/v1/adapters", json={"name": "x", "path": "ok"}, headers=AUTH).status_code == 201
    with TestClient(make_app(names=["a0"], adapter_root=None)) as c:
        r = c.post("/v1/adapters", json={"name": "x", "path": "a1"}, headers=AUTH)
        assert r.status_code == 403 and "--adapter-root" in r.json()["detail"]


@pytest.mark.parametrize("name", ["../x", "a.b", "__base__", "", "x" * 65, "with space"])
def test_bad_adapter_names_are_refused(client, name):
    r = client.post("/v1/adapters", json={"name": name, "path": "a1"}, headers=AUTH)
    assert r.status_code in (400, 422), name
    assert loaded(client) == NAMES


def test_an_adapter_for_another_base_model_gets_the_cores_message_and_the_server_keeps_serving(
        client, adapter_root, reference):
    with pytest.raises(dt.DeltatuneError) as core:
        dt.AdaptedModel(tiny_bert()).load(str(adapter_root / "foreign"), "foreign")
    r = client.post("/v1/adapters", json={"name": "foreign", "path": "foreign"}, headers=AUTH)
    assert r.status_code == 400
    assert str(core.value).replace(str(adapter_root.resolve()), "<adapter-root>") in r.json()["detail"]
    assert loaded(client) == NAMES
    r = client.post("/v1/classify", json={"adapter": "a5", "inputs": TEXTS[:2]})
    reference.check("a5", TEXTS[:2], r.json())


def test_the_lru_evicts_runtime_adapters_but_never_pinned_ones(make_app, reference):
    with TestClient(make_app(names=["a0"], max_adapters=3)) as c:
        for name in ["a1", "a2"]:
            assert c.post("/v1/adapters", json={"name": name, "path": name}, headers=AUTH).json()["evicted"] == []
        assert c.post("/v1/classify", json={"adapter": "a1", "inputs": ["x"]}).status_code == 200  # a2 is now LRU
        r = c.post("/v1/adapters", json={"name": "a3", "path": "a3"}, headers=AUTH)
        assert r.json() == {"loaded": "a3", "evicted": ["a2"]}
        r = c.post("/v1/classify", json={"adapter": "a2", "inputs": ["x"]})
        assert r.status_code == 404 and "evicted" in r.json()["detail"]
        assert c.get("/metrics").json()["adapters_evicted"] == 1
        assert c.get("/v1/adapters").json()["adapters"] == [
            {"name": "a0", "pinned": True}, {"name": "a1", "pinned": False}, {"name": "a3", "pinned": False}]
        r = c.post("/v1/classify", json={"adapter": "a0", "inputs": TEXTS[:2]})
        reference.check("a0", TEXTS[:2], r.json())


def test_an_adapter_that_cannot_share_a_batch_is_refused_before_anything_is_evicted(make_app, adapter_root):
    for folder, config in (("prompt", dt.PromptTuningConfig(num_virtual_tokens=3)),
                           ("trains-biases", dt.LoraConfig(r=2, targets=["q"], bias="all"))):
        if not (adapter_root / folder).is_dir():
            dt.attach(tiny_bert(), config).save(adapter_root / folder)
    with TestClient(make_app(names=["a0"], max_adapters=3)) as c:
        for name in ["a1", "a2"]:
            c.post("/v1/adapters", json={"name": name, "path": name}, headers=AUTH)
        for folder, phrase in (("prompt", "acts on the inputs"), ("trains-biases", "base biases")):
            r = c.post("/v1/adapters", json={"name": folder, "path": folder}, headers=AUTH)
            assert r.status_code == 400 and phrase in r.json()["detail"]
            assert loaded(c) == ["a0", "a1", "a2"]  # the cache was full: nothing made room for it


# --- load and failures ---------------------------------------------------------------------------------

def test_a_full_queue_answers_429_and_the_queued_requests_still_succeed(make_app, reference):
    app = make_app(names=["a0"], queue_size=2, max_batch=1, max_wait_ms=0)

    async def main():
        async with asgi_client(app) as c:
            gate = threading.Event()
            hold = asyncio.ensure_future(app.state.batcher.call(gate.wait, bounded=False))  # a busy model
            body = {"adapter": "a0", "inputs": [TEXTS[1]]}
            posts = [asyncio.ensure_future(c.post("/v1/classify", json=body)) for _ in range(5)]
            while sum(p.done() for p in posts) < 3:  # the refused ones answer at once
                await asyncio.sleep(0.01)
            refused = [p.result() for p in posts if p.done()]
            gate.set()
            await hold
            return refused, await asyncio.gather(*posts)

    refused, answers = run(main())
    assert [r.status_code for r in refused] == [429] * 3
    assert "busy" in refused[0].json()["detail"]
    assert sorted(r.status_code for r in answers) == [200, 200, 429, 429, 429]
    for r in answers:
        if r.status_code == 200:
            reference.check("a0", [TEXTS[1]], r.json())


def test_a_request_that_breaks_the_model_fails_alone_without_details(make_app, reference):
    app = make_app(max_batch=4, max_wait_ms=60_000)
    engine = app.state.engine
    forward = engine._classify_into

    def fragile(results, requests, which):
        if any("boom" in t for i in which for t in requests[i][1]):
            raise RuntimeError("secret internal detail")
        return forward(results, requests, which)

    engine._classify_into = fragile

    async def main():
        async with asgi_client(app) as c:
            jobs = [("a0", ["fine"]), ("a1", ["boom"]), ("a2", ["also fine"]), (dt.BASE_ADAPTER, ["ok"])]
            answers = await asyncio.gather(*(c.post("/v1/classify", json={"adapter": a, "inputs": t})
                                             for a, t in jobs))
            app.state.batcher.max_wait = 0  # later requests need not wait for company
            after = await c.post("/v1/classify", json={"adapter": "a1", "inputs": ["fine"]})
            health = await c.get("/healthz")
            return jobs, answers, after, health

    jobs, answers, after, health = run(main())
    assert [r.status_code for r in answers] == [200, 500, 200, 200]
    assert "secret" not in answers[1].text and "Traceback" not in answers[1].text
    for (adapter, texts), r in zip(jobs, answers):
        if r.status_code == 200:
            reference.check(adapter, texts, r.json())
    reference.check("a1", ["fine"], after.json())
    assert health.json() == {"status": "ok", "adapters": 8, "queue_depth": 0}


def test_health_metrics_and_docs(client):
    assert client.get("/healthz").json()["status"] == "ok"
    client.post("/v1/classify", json={"adapter": "a0", "inputs": ["x", "y"]})
    client.post("/v1/classify", json={"adapter": "zzz", "inputs": ["x"]})
    m = client.get("/metrics").json()
    assert m["requests"]["POST /v1/classify"] == {"200": 1, "404": 1}
    assert m["adapters_loaded"] == 8 and m["queue_size"] == 256
    assert m["batches"]["rows"] == 2 and m["batches"]["rows_histogram"] == {"2": 1}
    assert set(m["latency_ms"]["POST /v1/classify"]) == {"count", "p50", "p90", "p99"}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/classify", "/v1/generate", "/v1/adapters", "/v1/adapters/{name}", "/healthz", "/metrics"} <= set(paths)


def test_metrics_count_each_api_route_by_its_template_and_every_other_path_as_other(client):
    client.post("/v1/classify", json={"adapter": "a0", "inputs": ["x"]})
    client.post("/v1/generate", json={"adapter": "a0", "prompt": "x"})  # 400: the model is a classifier
    client.get("/v1/adapters")
    client.post("/v1/adapters", json={"name": "x", "path": "a1"})  # 401: no token
    client.delete("/v1/adapters/a0")
    client.get("/healthz")
    client.get("/metrics")
    client.get("/v1/adapters/a0/more")  # no route serves it, though it starts like one
    client.get("/docs")  # not an API route
    assert client.get("/metrics").json()["requests"] == {
        "POST /v1/classify": {"200": 1}, "POST /v1/generate": {"400": 1}, "GET /v1/adapters": {"200": 1},
        "POST /v1/adapters": {"401": 1}, "DELETE /v1/adapters/{name}": {"401": 1}, "GET /healthz": {"200": 1},
        "GET /metrics": {"200": 1}, "GET other": {"200": 1, "404": 1}}


def test_metrics_count_methods_outside_http_as_other_so_clients_cannot_grow_the_table(client):
    for i in range(3):
        assert client.request(f"X{i}", "/healthz").status_code == 405
    client.put("/healthz")
    assert client.get("/metrics").json()["requests"] == {"other /healthz": {"405": 3}, "PUT /healthz": {"405": 1}}


def test_classify_answers_the_models_label_names_and_null_for_placeholders(adapter_root, tokenizer, reference):
    """A trained or merged model keeps its class names in id2label (deltatune merge writes them):
    the answer names the chosen class; transformers' LABEL_i placeholders give null."""
    names = ["negative", "neutral", "positive"]
    model = served_model(adapter_root, ["a0"])
    model.base_model.config.id2label = dict(enumerate(names))
    with TestClient(create_app(model, tokenizer), raise_server_exceptions=False) as c:
        body = c.post("/v1/classify", json={"adapter": "a0", "inputs": TEXTS[:4]}).json()
    reference.check("a0", TEXTS[:4], body)
    assert [out["label_name"] for out in body["outputs"]] == [names[out["label"]] for out in body["outputs"]]
    with TestClient(create_app(served_model(adapter_root, ["a0"]), tokenizer)) as c:
        body = c.post("/v1/classify", json={"adapter": "a0", "inputs": TEXTS[:2]}).json()
    assert [out["label_name"] for out in body["outputs"]] == [None, None]
