"""Sharded training: per-process parameter memory and step time of a LoRA step on SmolLM2-135M's
architecture (random weights, LoRA r=8 on q and v), as one process, as DDP over two processes and
as FSDP2 (``train.distributed: fsdp``) over two processes, with the same global batch.

Parameter bytes are measured from what each process holds (its local shards under FSDP); peak
RSS is each process's own; the step time is rank 0's wall-clock median (the processes share the
machine's cores, so CPU time would hide the waiting on each other).

    python benchmarks/sharded.py [--steps 3] [--batch 2] [--length 128] [--device cpu|cuda] [--markdown FILE]

Without ``--mode`` it runs the three variants itself (torchrun for the two-process ones) and
prints one JSON line; ``--markdown`` also writes the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, peak_rss_mib  # noqa: E402
from lora_step import smollm2_config  # noqa: E402

import transformers  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.train import distributed, fsdp  # noqa: E402

transformers.logging.set_verbosity_error()
MODES = ("one", "ddp", "fsdp")
NOTES = """\
Parameter MiB is what each process holds, summed over its (local) tensors: FSDP halves it. Peak
RSS is higher under FSDP because every process first builds the whole model (random weights),
then keeps only its shards; the freed memory stays with the C allocator, and the gathered block
weights and communication buffers come on top. From a checkpoint on disk onto GPUs, `deltatune
train` loads the base on the CPU and moves each block's shard to the device as it is sharded.
On the CPU, FSDP's step pays for gathering every block's weights twice per step (forward and
backward) over gloo; DDP's shorter step is each process computing half the batch. The figures
were taken on a shared 2-core VM while other jobs ran: the ratios are rough."""


def worker(mode: str, steps: int, batch: int, length: int, device: str) -> dict:
    """Train ``steps`` (+1 warm-up) LoRA steps in this process; rank 0 returns the figures."""
    dist = distributed.setup(device)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(smollm2_config())
    model = dt.attach(model, dt.LoraConfig(r=8, alpha=16, targets=["q", "v"]))
    if mode == "fsdp":
        fsdp.shard(model, dist)  # moves the shards to the device
    else:
        model.to(dist.device)
    wrapped = model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    per_process = batch // dist.world_size
    generator = torch.Generator().manual_seed(dist.rank)
    times = []
    for step in range(steps + 1):
        ids = torch.randint(0, 49152, (per_process, length), generator=generator).to(dist.device)
        dist.barrier()
        if dist.device.type == "cuda":
            torch.cuda.synchronize(dist.device)
        start = time.perf_counter()
        wrapped(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dist.device.type == "cuda":
            torch.cuda.synchronize(dist.device)
        dist.barrier()
        if step:  # the first step is the warm-up
            times.append(time.perf_counter() - start)
    gather = lambda value: [float(t) for t in dist.gather_tensor(torch.tensor([float(value)], dtype=torch.float64))]
    result = {"mode": mode, "processes": dist.world_size, "step_s": round(statistics.median(times), 3),
              "parameter_mib_per_process": [round(b / 2**20, 1) for b in gather(fsdp.local_parameter_bytes(model))],
              "peak_rss_mib_per_process": [round(m, 1) for m in gather(peak_rss_mib())]}
    if dist.device.type == "cuda":
        result["cuda_peak_mib_per_process"] = [round(m / 2**20, 1) for m in
                                               gather(torch.cuda.max_memory_allocated(dist.device))]
    distributed.teardown()
    return result


def run_variant(mode: str, args: argparse.Namespace) -> dict:
    here = str(Path(__file__).resolve())
    tail = ["--mode", mode, "--steps", str(args.steps), "--batch", str(args.batch), "--length", str(args.length),
            "--device", args.device]
    head = [sys.executable] if mode == "one" else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([*head, here, *tail], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def markdown(result: dict) -> str:
    one = result["variants"]["one"]
    lines = ["# Sharded training: one process, DDP and FSDP2", "",
             f"`python benchmarks/sharded.py`: SmolLM2-135M's architecture, LoRA r=8 on q and v, global batch "
             f"{result['batch']} x {result['length']} tokens, {result['device']}, median of {result['steps']} steps.",
             "", "| variant | parameter MiB per process | vs one process | peak RSS MiB per process | step s "
                 "| vs one process |", "|---|---|---|---|---|---|"]
    for mode, row in result["variants"].items():
        params = row["parameter_mib_per_process"]
        label = "one process" if mode == "one" else f"{mode} x {row['processes']}"
        lines.append(f"| {label} | "
                     f"{' / '.join(map(str, params))} | {max(params) / one['parameter_mib_per_process'][0]:.2f} | "
                     f"{' / '.join(map(str, row['peak_rss_mib_per_process']))} | {row['step_s']} | "
                     f"{row['step_s'] / one['step_s']:.2f} |")
    lines += ["", NOTES, "", "Raw result:", "", "```json", json.dumps(result), "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, help="run one variant in this process (internal)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="global batch (split over the processes)")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    if args.mode:
        result = worker(args.mode, args.steps, args.batch, args.length, args.device)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result), flush=True)
        return
    result = {"benchmark": "sharded", "device": args.device, "steps": args.steps, "batch": args.batch,
              "length": args.length, "machine": machine(), "variants": {m: run_variant(m, args) for m in MODES}}
    print(json.dumps(result))
    if args.markdown:
        Path(args.markdown).write_text(markdown(result))


if __name__ == "__main__":
    main()
