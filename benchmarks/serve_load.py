"""Throughput and latency of ``deltatune serve`` with 1 adapter vs 32 adapters under the same load.

Two real servers (``deltatune serve --model minilm``, subprocesses on loopback) hold 1 and 32
random LoRA adapters (r=8 on q, v) of the embedded MiniLM. The same closed-loop load (``--clients``
concurrent clients, ``--requests`` requests of one SST-2-like sentence each) goes to each in
alternating rounds; with 32 adapters every request names a random one, so batches mix adapters.
Reports requests/s and p50/p99 latency per server and the throughput ratio (target: 32 adapters
>= 0.8x one adapter). Answers are checked: no 5xx, every answer names the adapter it was asked for.

    python benchmarks/serve_load.py [--requests 600] [--clients 32] [--rounds 2] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine  # noqa: E402

import torch  # noqa: E402

import deltatune as dt  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()

SENTENCES = [
    "a gripping, beautifully acted film", "the plot never goes anywhere", "charming from start to finish",
    "an hour too long and twice as dull", "funny, warm and surprisingly wise", "a mess of a script",
    "the best thing in it is the music", "i wanted to leave after ten minutes", "quietly moving",
    "it is neither good nor bad, just there", "a triumph of style over substance", "smart and sharp",
]


def make_adapters(root: Path, count: int) -> list[str]:
    """``count`` random LoRA adapters (r=8 on q, v, moved classifier head) of MiniLM under ``root``."""
    names = []
    for i in range(count):
        torch.manual_seed(1000 + i)
        model = dt.attach(dt.load_model("minilm", num_labels=2), dt.LoraConfig(r=8, alpha=16, targets=["q", "v"],
                                                                                init="random"))
        model.save(str(root / f"a{i}"))
        names.append(f"a{i}")
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``deltatune serve`` in a subprocess, waited for until /healthz answers."""

    def __init__(self, root: Path, names: list[str], threads: int) -> None:
        self.port = free_port()
        spec = ",".join(f"{n}={root / n}" for n in names)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deltatune", "serve", "--model", "minilm", "--adapters", spec,
             "--port", str(self.port), "--log-level", "warning", "--max-batch", "32", "--max-wait-ms", "5",
             "--queue-size", "4096"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"

    async def wait(self, client) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if (await client.get(self.url + "/healthz")).status_code == 200:
                    return
            except Exception:  # not listening yet
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError("the server did not start in 180 s")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def load(client, url: str, names: list[str], requests: int, clients: int, seed: int) -> dict:
    """Closed-loop load: ``clients`` workers share ``requests`` requests; returns throughput and latency."""
    rng = random.Random(seed)
    plan = [(rng.choice(names), rng.choice(SENTENCES)) for _ in range(requests)]
    latencies: list[float] = []
    errors: list[str] = []

    async def worker(jobs: list[tuple[str, str]]) -> None:
        for adapter, text in jobs:
            start = time.perf_counter()
            r = await client.post(url + "/v1/classify", json={"adapter": adapter, "inputs": [text]})
            latencies.append(time.perf_counter() - start)
            if r.status_code != 200:
                errors.append(f"{r.status_code}: {r.text[:200]}")
            elif r.json()["adapter"] != adapter or len(r.json()["outputs"]) != 1:
                errors.append(f"mixed-up answer for {adapter}: {r.text[:200]}")

    began = time.perf_counter()
    await asyncio.gather(*(worker(plan[i::clients]) for i in range(clients)))
    wall = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"{len(errors)} bad answers, e.g. {errors[:3]}")
    latencies.sort()
    return {"requests_per_s": requests / wall, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


async def main_async(args) -> dict:
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = make_adapters(root, 32)
        setups = {"1 adapter": names[:1], "32 adapters": names}
        servers = {key: Server(root, chosen, args.threads) for key, chosen in setups.items()}
        limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
        results: dict[str, list[dict]] = {key: [] for key in setups}
        try:
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                for server in servers.values():
                    await server.wait(client)
                for key, server in servers.items():  # warm-up
                    await load(client, server.url, setups[key], 64, args.clients, seed=0)
                for r in range(args.rounds):
                    for key, server in servers.items():
                        results[key].append(await load(client, server.url, setups[key], args.requests,
                                                       args.clients, seed=r + 1))
        finally:
            for server in servers.values():
                server.stop()
    summary = {key: {m: statistics.median(run[m] for run in runs) for m in runs[0]} for key, runs in results.items()}
    ratio = summary["32 adapters"]["requests_per_s"] / summary["1 adapter"]["requests_per_s"]
    return {"benchmark": "serve_load", "model": "minilm", "requests": args.requests, "clients": args.clients,
            "rounds": args.rounds, "server_threads": args.threads, "results": summary,
            "throughput_ratio_32_vs_1": round(ratio, 3), "target": ">= 0.8"}


def markdown(report: dict) -> str:
    rows = [f"| {key} | {v['requests_per_s']:.1f} | {v['p50_ms']:.0f} | {v['p99_ms']:.0f} |"
            for key, v in report["results"].items()]
    return "\n".join([
        "| server | requests/s | p50 latency (ms) | p99 latency (ms) |", "|---|---|---|---|", *rows, "",
        f"Throughput with 32 adapters / with 1: **{report['throughput_ratio_32_vs_1']:.2f}x** (target >= 0.8x). "
        f"{report['requests']} requests x {report['rounds']} rounds from {report['clients']} concurrent clients, "
        f"one sentence per request, MiniLM, LoRA r=8 on q,v, server threads {report['server_threads']}."])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="torch threads per server (the load generator needs a core too)")
    p.add_argument("--markdown", help="also write the table to this file")
    args = p.parse_args()
    report = asyncio.run(main_async(args))
    report["machine"] = machine()
    print(json.dumps(report))
    if args.markdown:
        Path(args.markdown).write_text(markdown(report) + "\n")


if __name__ == "__main__":
    main()
