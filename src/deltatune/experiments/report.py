"""A sweep's report: ``results.csv`` and ``results.md`` (:mod:`~deltatune.experiments.results`)
and the plots (:mod:`~deltatune.experiments.plots`, which reads the same aggregates)."""

from __future__ import annotations

from pathlib import Path

from deltatune.experiments.grid import Run, Sweep
from deltatune.experiments.results import aggregate, collect, markdown, write_csv
from deltatune.train.files import write_text


def write_report(sweep: Sweep, plots: bool = True, *, runs: list[Run] | None = None) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md`` and (with ``plots``) the plots into the sweep's
    output folder from the run folders on disk; returns the paths written. ``runs``: the
    sweep's runs when they are built already (default: built here)."""
    out = sweep.output_dir
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(sweep.runs() if runs is None else runs, sweep.keys)
    written = {"csv": write_csv(rows, sweep.keys, out / "results.csv")}
    entries = aggregate(rows)
    write_text(out / "results.md", markdown(entries))
    written["markdown"] = out / "results.md"
    if plots and any(e["n"] for e in entries):
        from deltatune.experiments import plots as plots_mod

        written.update(plots_mod.sweep_plots(rows, sweep.keys, out))
    return written
