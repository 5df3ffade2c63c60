"""A sweep's results: one row per run (``results.csv``) and mean +- std per setting (``results.md``).

Rows come from each run folder's ``summary.json``, so the files can be rebuilt at any time from
what is on disk (``deltatune sweep SWEEP.yaml --report-only``). Standard deviations are sample
standard deviations over seeds (``n - 1`` in the denominator); a setting with one finished seed
shows its value alone.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable

from deltatune.experiments.grid import Run, format_value
from deltatune.experiments.sweep import ERROR_FILE, is_finished
from deltatune.train.files import write_atomic

#: the columns every row has, after the grid keys
BASE_COLUMNS = ("seed", "kind", "label", "method", "status", "trainable_params", "total_params", "trainable_percent")
TAIL_COLUMNS = ("steps", "wall_time_s", "train_time_s", "peak_memory_mb", "folder", "error")


def run_row(run: Run, keys: Iterable[str]) -> dict[str, Any]:
    """The row of one run: its grid values, seed, method, status and (when finished) the
    numbers from its ``summary.json`` (eval metrics as ``eval_<name>``)."""
    row: dict[str, Any] = {k: format_value(run.setting[k]) if k in run.setting else "" for k in keys}
    row.update(seed=run.seed, kind=run.kind, label=run.label, method=run.method, folder=str(run.folder))
    if is_finished(run):
        summary = json.loads((run.folder / "summary.json").read_text())
        row["status"] = "ok"
        for key in ("trainable_params", "total_params", "trainable_percent", "steps", "wall_time_s",
                    "train_time_s", "peak_memory_mb"):
            row[key] = summary.get(key, "")
        for name, value in (summary.get("metrics") or {}).items():
            row[f"eval_{name}"] = value
    elif (run.folder / ERROR_FILE).is_file():
        row["status"] = "failed"
        row["error"] = (run.folder / ERROR_FILE).read_text().strip().splitlines()[0][:300]
    else:
        row["status"] = "pending"
    return row


def collect(runs: Iterable[Run], keys: Iterable[str]) -> list[dict[str, Any]]:
    """Rows of the ``runs`` that finished or failed (pending runs are left out), with the grid
    values of ``keys``."""
    rows = [run_row(run, keys) for run in runs]
    return [r for r in rows if r["status"] != "pending"]


def metric_names(rows: list[dict]) -> list[str]:
    """The ``eval_*`` columns present in ``rows``, in first-seen order."""
    names: list[str] = []
    for row in rows:
        names += [k for k in row if k.startswith("eval_") and k not in names]
    return names


def write_csv(rows: list[dict], keys: list[str], path: Path) -> Path:
    """``results.csv``: grid keys, then :data:`BASE_COLUMNS`, the metrics, :data:`TAIL_COLUMNS`."""
    columns = list(keys) + list(BASE_COLUMNS) + metric_names(rows) + list(TAIL_COLUMNS)

    def write(temp: str) -> None:
        with open(temp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({c: row.get(c, "") for c in columns})

    write_atomic(path, write)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a ``results.csv`` (all values as strings)."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``None`` for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(rows: list[dict]) -> list[dict[str, Any]]:
    """One entry per setting (``kind`` + ``label``, in first-seen order) over its ``ok`` rows:
    ``{"label", "kind", "method", "n", "failed", "trainable_params", "wall_time_s", metric:
    (mean, std)}``."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["kind"], row["label"]), []).append(row)
    out = []
    for (kind, label), members in groups.items():
        ok = [r for r in members if r["status"] == "ok"]
        entry: dict[str, Any] = {"label": label, "kind": kind, "method": members[0]["method"], "n": len(ok),
                                 "failed": sum(r["status"] == "failed" for r in members)}
        if ok:
            entry["trainable_params"] = int(float(ok[0]["trainable_params"]))
            entry["wall_time_s"] = mean_std([float(r["wall_time_s"]) for r in ok])
            for name in metric_names(ok):
                values = [float(r[name]) for r in ok if r.get(name) not in (None, "")]
                if values:
                    entry[name] = mean_std(values)
        out.append(entry)
    return out


def _cell(value: tuple[float, float | None] | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    mean, std = value
    if math.isnan(mean):
        return "nan"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(entries: list[dict], metrics: list[str] | None = None) -> str:
    """A Markdown table: setting, method, seeds, each metric as mean ± std, trainable
    parameters and mean wall time. ``metrics`` picks and orders the ``eval_*`` columns."""
    if metrics is None:
        metrics = metric_names(entries)
    head = ["setting", "method", "seeds"] + [m.removeprefix("eval_") for m in metrics] + ["trainable params", "wall time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        seeds = str(e["n"]) + (f" ({e['failed']} failed)" if e["failed"] else "")
        cells = [e["label"] if e["kind"] == "grid" else f"baseline: {e['label']}", e["method"], seeds]
        cells += [_cell(e.get(m)) for m in metrics]
        cells += [f"{e['trainable_params']:,}" if "trainable_params" in e else "-", _cell(e.get("wall_time_s"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
