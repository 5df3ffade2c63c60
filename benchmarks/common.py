"""Shared measurement helpers for the benchmarks: machine facts, interleaved timing, peak RSS.

Every benchmark reports ratios against a reference measured in the same run, never absolute
seconds alone: machines here differ (AVX2 only vs AMX with native bf16).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


def machine() -> dict:
    """What the numbers were measured on."""
    import peft
    import transformers

    info = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": bf16_is_native("cpu"),
        "avx512_bf16": bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()),
        "threads": DEFAULT_THREADS,
        "cores": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    return info


def bf16_is_native(device: str) -> bool:
    """bf16 autocast pays off on CUDA and on CPUs with AVX512-BF16/AMX, and is slow elsewhere
    (the same rule as the trainer's ``precision: auto``)."""
    from deltatune.core.precision import cpu_has_native_bf16
    return device == "cuda" or cpu_has_native_bf16()


#: torch's thread count before any benchmark changes it: what a user's process runs with
DEFAULT_THREADS = torch.get_num_threads()


@dataclass(frozen=True)
class ClockMode:
    """One way of timing: a thread count and a clock."""

    key: str
    threads: int
    now: Callable[[], float]
    note: str


def clock_modes(device: str) -> list[ClockMode]:
    """How a benchmark times its variants, the headline first.

    The headline is wall clock at torch's default thread count: what a user sees. On the CPU the
    process's CPU time with one torch thread comes beside it: steady on a shared machine (other
    processes' work does not count), but blind to what threads cost (idle or waiting workers).
    """
    wall = ClockMode("wall", DEFAULT_THREADS, time.perf_counter,
                     f"wall clock (time.perf_counter) at torch's default thread count ({DEFAULT_THREADS})")
    if device != "cpu":
        return [wall]
    return [wall, ClockMode("cpu_1thread", 1, time.process_time,
                            "CPU time of this process (time.process_time) with one torch thread")]


@contextlib.contextmanager
def torch_threads(count: int):
    """Run the block with ``count`` torch threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def each_clock(device: str, measure: Callable[[ClockMode], dict]) -> dict:
    """``measure(mode)`` for every clock mode, each under its thread count: the headline's
    figures at the top level, the others under their key (``"cpu_1thread"``), and ``"clocks"``
    saying what each means."""
    modes = clock_modes(device)
    out: dict = {}
    for mode in modes:
        with torch_threads(mode.threads):
            figures = measure(mode)
        if mode is modes[0]:
            out.update(figures)
        else:
            out[mode.key] = figures
    out["clocks"] = {mode.key: mode.note for mode in modes}
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


#: glibc settings under which freed memory stays with the process (see :func:`steady_allocator`)
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30)}


def steady_allocator(argv: list[str]) -> None:
    """Re-run this script (once, on Linux) with :data:`STEADY_MALLOC` in the environment.

    Why: with glibc's defaults a step's large activations may go back to the OS when freed and
    fault back in on the next step, and whether they do depends on what the variant before it
    in the interleaved rounds freed. Measured per MiniLM step in one process: the frozen model 0
    minor page faults, deltatune 34,500, peft 67,500 (0.6 s of system time, counted by the CPU
    clock). That is allocator noise, larger than the differences the step benchmarks look for.
    """
    if sys.platform != "linux" or _allocator_is_steady():
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *argv], {**os.environ, **STEADY_MALLOC})


def _allocator_is_steady() -> bool:
    return all(os.environ.get(k) == v for k, v in STEADY_MALLOC.items())


def allocator_note() -> str:
    """Which allocator settings this process runs with, for the benchmark's result."""
    return ("glibc keeps freed memory (" + ", ".join(f"{k}={v}" for k, v in STEADY_MALLOC.items()) + ")"
            if _allocator_is_steady() else "the C allocator's defaults")


def step_benchmark(name: str, device: str, **facts) -> tuple[dict, list[str]]:
    """Start a step benchmark: ``(result dict, precisions to run)``; records why bf16 is skipped
    where it is not native."""
    result: dict = {"benchmark": name, **facts, "device": device, "machine": machine()}
    precisions = ["fp32"] + (["bf16"] if bf16_is_native(device) else [])
    if "bf16" not in precisions:
        result["bf16"] = {"skipped": "no native bf16 on this CPU (bf16 autocast would be ~20x slower)"}
    return result, precisions


def interleaved_times(fns: dict[str, Callable[[], None]], rounds: int, warmup: int = 1,
                      device: str = "cpu", now: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each function in every round by clock ``now``, run round-robin so
    drift hits all alike. Each round runs them in another (seeded) order, so that no function
    always follows the same one: what the one before leaves behind (the allocator's free lists,
    the caches) can favour whichever runs after the variant most like it."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    orders = random.Random(0)
    for _ in range(rounds):
        for key in orders.sample(list(fns), len(fns)):
            fn = fns[key]
            _sync(device)
            start = now()
            fn()
            _sync(device)
            times[key].append(now() - start)
    return times


def fastest(times: dict[str, list[float]]) -> dict[str, float]:
    """Each function's fastest round: the figure the step ratios use.

    Why the minimum: interference on a shared machine (other processes, memory-bandwidth
    contention, the host of this VM) only ever adds time, so the fastest round is the one nearest
    the code's own cost. Measured on 20 interleaved rounds of lora_step's four variants (a MiniLM
    step varied by up to a third from round to round): over every window of 3 consecutive rounds, the
    ratio of minima had a standard deviation of 0.027 where the ratio of medians had 0.038, and over
    windows of 5 rounds 0.014 against 0.035.
    """
    return {k: min(v) for k, v in times.items()}


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    """Each function's median round, reported next to :func:`fastest` for comparison."""
    return {k: statistics.median(v) for k, v in times.items()}


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_mib() -> float:
    """Current resident set size of this process, MiB."""
    return _status_mib("VmRSS")


def reset_peak_rss() -> None:
    """Restart peak-RSS tracking from the current size (Linux: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_rss_mib() -> float:
    """Peak resident set size since the last :func:`reset_peak_rss`, MiB."""
    return _status_mib("VmHWM")


def training_memory_mib(model: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> dict[str, float]:
    """What a training step holds beyond the model itself, counted exactly rather than read off
    the allocator: the tensors autograd saves for the backward (distinct storages, not counting
    the model's own parameters and buffers), plus gradient and two AdamW moments per trainable
    parameter. ``forward()`` returns the loss. Unlike peak RSS this does not depend on what the
    allocator kept from earlier work, so variants compare within one process."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    del loss
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    mib = 2**20
    return {"saved_for_backward_mib": round(sum(saved.values()) / mib, 1),
            "grads_and_adamw_mib": round(3 * trainable / mib, 1),
            "total_mib": round((sum(saved.values()) + 3 * trainable) / mib, 1)}


RESULTS = Path(__file__).resolve().parent / "results"


def finish(result: dict, headline: list[str]) -> None:
    """End a benchmark: the headline figures on stderr, for a person; the result as one JSON
    line on stdout (run_all.py reads the last line) and in ``benchmarks/results/NAME.json``."""
    for line in headline:
        print(line, file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    name = result["benchmark"] + ("" if result.get("model", "minilm") == "minilm" else f"_{result['model']}")
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result), flush=True)


def run_probe(script: str, *args: str) -> dict:
    """Run ``script --probe ARGS`` in a fresh interpreter and return the JSON it prints last.

    Peak memory can only be compared across variants in separate processes.
    """
    out = subprocess.run([sys.executable, script, "--probe", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
