"""``deltatune sweep``: run every run of a sweep, in parallel worker processes, resumably.

Each run trains in its own folder (``<output_dir>/runs/<setting>/seed<k>``) through
``python -m deltatune train run.yaml --resume`` in a separate process, so one crashing run
(an error, a segfault, running out of memory) is recorded as ``failed`` and the sweep goes
on. A run whose ``summary.json`` exists is finished and skipped; an interrupted one resumes
from its last checkpoint. ``workers=0`` trains in this process instead (debugging, tests).

Threads: each worker gets ``max(1, cores // workers)`` torch threads (``train.threads``,
unless the recipe asks for fewer), so the workers never oversubscribe the machine.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from deltatune.experiments.grid import Run
from deltatune.train.files import write_text

RUN_FILE = "run.yaml"
ERROR_FILE = "error.txt"
LOG_FILE = "train.log"


@dataclass
class Outcome:
    """How one run ended: ``status`` is ``done`` (trained now), ``cached`` (finished before)
    or ``failed`` (``error`` says why; the full log is in the run folder)."""

    run: Run
    status: str
    error: str = ""
    seconds: float = 0.0


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Torch threads for each of ``workers`` parallel runs on ``cores`` cores (at least 1)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(workers, 1))


def is_finished(run: Run) -> bool:
    """A run is finished when its ``summary.json`` exists (``train`` writes it last)."""
    return (run.folder / "summary.json").is_file()


def prepare(run: Run, threads: int) -> Path:
    """Write the run's recipe to ``run.yaml`` in its folder (threads capped); returns the path."""
    recipe = dict(run.recipe)
    train = dict(recipe.get("train") or {})
    if not train.get("threads") or train["threads"] > threads:
        train["threads"] = threads
    recipe["train"] = train
    run.folder.mkdir(parents=True, exist_ok=True)
    path = run.folder / RUN_FILE
    write_text(path, yaml.safe_dump(recipe, sort_keys=False))
    (run.folder / ERROR_FILE).unlink(missing_ok=True)
    return path


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def execute(run: Run, threads: int, in_process: bool = False) -> Outcome:
    """Train ``run`` (unless finished); never raises for a failing run."""
    if is_finished(run):
        return Outcome(run, "cached")
    began = time.perf_counter()
    path = prepare(run, threads)
    if in_process:
        from deltatune.train import train

        log = io.StringIO()
        try:
            train(str(path), resume=True, stream=log)
            error = ""
        except BaseException as exc:  # noqa: BLE001 - a failing run is recorded, the sweep goes on
            if isinstance(exc, KeyboardInterrupt):
                raise
            error = f"{type(exc).__name__}: {exc}"
            log.write(traceback.format_exc())
        (run.folder / LOG_FILE).write_text(log.getvalue())
    else:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "TOKENIZERS_PARALLELISM": "false"}
        with open(run.folder / LOG_FILE, "w") as log_file:
            proc = subprocess.run([sys.executable, "-m", "deltatune", "train", str(path), "--resume"],
                                  stdout=log_file, stderr=subprocess.STDOUT, env=env)
        text = (run.folder / LOG_FILE).read_text(errors="replace")
        error = "" if proc.returncode == 0 else f"exit status {proc.returncode}: {_tail(text, 3)}"
    seconds = time.perf_counter() - began
    if not error and not is_finished(run):
        error = "the run ended without writing summary.json"
    if error:
        (run.folder / ERROR_FILE).write_text(error + "\n")
        return Outcome(run, "failed", error, seconds)
    return Outcome(run, "done", "", seconds)


def run_sweep(runs: list[Run], workers: int = 1, on_outcome: Callable[[Outcome, int, int], None] | None = None,
              cores: int | None = None) -> list[Outcome]:
    """Train ``runs`` (a sweep's, from ``Sweep.runs()``; finished ones are skipped), ``workers``
    at a time.

    ``workers=0`` trains in this process, one run after another. Returns the outcomes in the
    order of ``runs``; ``on_outcome(outcome, done, total)`` is called as runs end.
    """
    threads = threads_per_worker(max(workers, 1), cores)
    outcomes: dict[int, Outcome] = {}

    def report(i: int, outcome: Outcome) -> None:
        outcomes[i] = outcome
        if on_outcome is not None:
            on_outcome(outcome, len(outcomes), len(runs))

    if workers <= 0:
        for i, run in enumerate(runs):
            report(i, execute(run, threads, in_process=True))
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(execute, run, threads): i for i, run in enumerate(runs)}
            for future in as_completed(futures):
                report(futures[future], future.result())
    return [outcomes[i] for i in range(len(runs))]


def describe(outcome: Outcome, done: int, total: int) -> str:
    """One progress line for ``outcome``."""
    run = outcome.run
    where = f"[{done}/{total}] {run.label} seed {run.seed}"
    if outcome.status == "failed":
        return f"{where}: FAILED ({outcome.error.splitlines()[0] if outcome.error else ''}); see {run.folder / LOG_FILE}"
    if outcome.status == "cached":
        return f"{where}: finished before, skipped"
    summary = json.loads((run.folder / "summary.json").read_text())
    shown = ", ".join(f"{k} {v:.4f}" for k, v in summary.get("metrics", {}).items() if isinstance(v, float))
    return f"{where}: {shown or 'done'} in {outcome.seconds:.0f}s"
