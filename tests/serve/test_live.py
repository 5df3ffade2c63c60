"""A real uvicorn server on 127.0.0.1: answers over loopback, a bounded load test (2,000 requests
from 32 concurrent clients over 8 adapters), hot load/unload under traffic, and the CLI."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest

import deltatune as dt
from deltatune.serve import create_app
from tests.serve.conftest import NAMES, TEXTS, LiveServer, run, served_model, tiny_bert

TOKEN = "live-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(adapter_root, tokenizer):
    app = create_app(served_model(adapter_root), tokenizer, adapter_root=adapter_root, admin_token=TOKEN,
                     max_batch=32, max_wait_ms=2, queue_size=512)
    with LiveServer(app) as live:
        yield live


async def clients(url: str, jobs: list, concurrency: int, check) -> Counter:
    """Send ``jobs`` (``(adapter, texts)``) from ``concurrency`` clients; ``check(job, response)``
    each answer; returns the status counts."""
    statuses: Counter = Counter()
    queue = list(reversed(jobs))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        async def one_client():
            while queue:
                job = queue.pop()
                r = await client.post("/v1/classify", json={"adapter": job[0], "inputs": job[1]})
                statuses[r.status_code] += 1
                check(job, r)
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return statuses


def test_answers_over_loopback_equal_the_library(server, reference):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        for name in [NAMES[0], NAMES[7], dt.BASE_ADAPTER]:
            r = c.post("/v1/classify", json={"adapter": name, "inputs": TEXTS})
            assert r.status_code == 200
            reference.check(name, TEXTS, r.json())
        r = c.post("/v1/classify", content=b"{oops", headers={"content-type": "application/json"})
        assert r.status_code == 422


def test_load_2000_requests_32_clients_8_adapters_no_5xx_no_mixups(server, reference):
    rng = random.Random(0)
    adapters = [*NAMES, dt.BASE_ADAPTER]
    jobs = [(rng.choice(adapters), rng.sample(TEXTS, rng.choice([1, 1, 1, 2, 3]))) for _ in range(2000)]
    for adapter, texts in jobs:  # warm the reference outside the clients' loop
        for text in texts:
            reference.probabilities(adapter, text)
    wrong = []

    def check(job, r):
        if r.status_code == 200:
            try:
                reference.check(job[0], job[1], r.json())
            except AssertionError as exc:
                wrong.append((job, str(exc)[:200]))

    statuses = run(clients(server.url, jobs, 32, check))
    assert statuses == Counter({200: 2000})
    assert wrong == []
    metrics = httpx.get(f"{server.url}/metrics").json()
    assert metrics["batches"]["mean_adapters"] > 1  # requests for different adapters did share batches


def test_hot_load_and_unload_while_requests_stream(server, reference):
    rng = random.Random(1)
    jobs = [(rng.choice(NAMES[:4] + ["hot"]), [rng.choice(TEXTS)]) for _ in range(600)]
    wrong, hot_answers = [], Counter()

    def check(job, r):
        if job[0] == "hot":
            hot_answers[r.status_code] += 1
            if r.status_code == 200:
                # "hot" is a4's folder loaded under another name: it must answer exactly like a4
                try:
                    reference.check("a4", job[1], {**r.json(), "adapter": "a4"})
                except AssertionError as exc:
                    wrong.append((job, str(exc)[:200]))
            return
        try:
            reference.check(job[0], job[1], r.json())
        except (AssertionError, KeyError) as exc:
            wrong.append((job, r.status_code, str(exc)[:200]))

    async def admin(done: asyncio.Event) -> list[int]:
        codes = []
        async with httpx.AsyncClient(base_url=server.url, timeout=120, headers=AUTH) as c:
            while not done.is_set():
                codes.append((await c.post("/v1/adapters", json={"name": "hot", "path": "a4"})).status_code)
                await asyncio.sleep(0.01)
                codes.append((await c.delete("/v1/adapters/hot")).status_code)
        return codes

    async def main():
        done = asyncio.Event()
        churn = asyncio.ensure_future(admin(done))
        statuses = await clients(server.url, jobs, 16, check)
        done.set()
        return statuses, await churn

    statuses, admin_codes = run(main())
    assert wrong == []
    assert all(code < 500 for code in statuses), statuses
    assert set(hot_answers) <= {200, 404}
    assert statuses[200] == 600 - hot_answers[404]
    assert admin_codes and set(admin_codes) == {200, 201}
    with httpx.Client(base_url=server.url) as c:
        assert [a["name"] for a in c.get("/v1/adapters").json()["adapters"]] == NAMES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_cli_serves_a_local_model_folder(adapter_root, tokenizer, reference, tmp_path):
    folder = tmp_path / "model"
    tiny_bert().save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    port = free_port()
    env = {**os.environ, "DELTATUNE_ADMIN_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "deltatune", "serve", "--model", str(folder), "--port", str(port),
           "--adapters", f"a0={adapter_root / 'a0'},a6={adapter_root / 'a6'}", "--adapter-root", str(adapter_root),
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "deltatune serve did not come up"
            time.sleep(0.2)
        for name in ["a0", "a6"]:
            r = httpx.post(f"{url}/v1/classify", json={"adapter": name, "inputs": TEXTS[:3]})
            reference.check(name, TEXTS[:3], r.json())
        r = httpx.post(f"{url}/v1/adapters", json={"name": "a2", "path": "a2"}, headers=AUTH)
        assert r.status_code == 201
        r = httpx.post(f"{url}/v1/classify", json={"adapter": "a2", "inputs": TEXTS[:3]})
        reference.check("a2", TEXTS[:3], r.json())
        pinned = {a["name"]: a["pinned"] for a in httpx.get(f"{url}/v1/adapters").json()["adapters"]}
        assert pinned == {"a0": True, "a6": True, "a2": False}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_cli_reports_bad_arguments_in_one_line(tmp_path):
    from deltatune.cli import main
    from deltatune.serve.launch import parse_adapters

    assert parse_adapters("a=x, b = y/z ,") == {"a": "x", "b": "y/z"}
    for spec in ["a", "=x", "a=", "a=x,a=y"]:
        with pytest.raises(dt.ConfigError):
            parse_adapters(spec)
    assert main(["serve", "--model", str(tmp_path / "no-such-model")]) == 1
