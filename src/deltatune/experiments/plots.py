"""Plots of sweeps and analyses (matplotlib, Agg backend: files only, no display needed).

Every function returns ``{name: path}`` of what it wrote, or ``{}`` when matplotlib is not
installed (the tables are written either way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltatune.experiments.results import aggregate, mean_std, metric_names
from deltatune.train.callbacks import label_axes, pyplot, save_figure

#: resolution of the experiment plots
DPI = 120


def _primary(metrics: list[str]) -> str | None:
    for name in ("eval_accuracy", "eval_f1", "eval_perplexity", "eval_loss"):
        if name in metrics:
            return name
    return metrics[0] if metrics else None


def sweep_plots(rows: list[dict], keys: list[str], out: Path) -> dict[str, Path]:
    """``metric_vs_params.png`` (every setting and baseline, mean with std error bars, log x)
    and, when a grid key is a rank (``method.r``), ``metric_vs_rank.png`` (one line per
    combination of the other grid keys, baselines as horizontal lines)."""
    plt = pyplot()
    ok = [r for r in rows if r["status"] == "ok"]
    metric = _primary(metric_names(ok))
    if plt is None or metric is None:
        return {}
    name = metric.removeprefix("eval_")
    written: dict[str, Path] = {}
    entries = [e for e in aggregate(ok) if metric in e]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e in entries:
        mean, std = e[metric]
        marker = "s" if e["kind"] == "baseline" else "o"
        ax.errorbar([e["trainable_params"]], [mean], yerr=[std or 0.0], fmt=marker, capsize=3)
        ax.annotate(e["label"], (e["trainable_params"], mean), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    label_axes(ax, "trainable parameters", name, f"{name} vs trainable parameters (mean ± std over seeds)")
    written["metric_vs_params"] = save_figure(fig, out / "metric_vs_params.png", DPI)

    rank_keys = [k for k in keys if k.split(".")[-1] in ("r", "rank")]
    if rank_keys:
        rank_key = rank_keys[0]
        others = [k for k in keys if k != rank_key]
        lines: dict[tuple, dict[float, list[float]]] = {}
        for r in ok:
            if r["kind"] != "grid" or r.get(metric) in (None, ""):
                continue
            try:
                rank = float(r[rank_key])
            except (TypeError, ValueError):
                continue
            group = tuple(r.get(k, "") for k in others)
            lines.setdefault(group, {}).setdefault(rank, []).append(float(r[metric]))
        if lines:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for group, points in lines.items():
                xs = sorted(points)
                stats = [mean_std(points[x]) for x in xs]
                label = " ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(others, group)) or "LoRA"
                ax.errorbar(xs, [m for m, _ in stats], yerr=[s or 0.0 for _, s in stats], marker="o", capsize=3,
                            label=label)
            ax.set_xscale("log", base=2)
            for e in entries:
                if e["kind"] == "baseline":
                    ax.axhline(e[metric][0], linestyle="--", linewidth=1, color="gray")
                    ax.text(0.01, e[metric][0], f" {e['label']}", transform=ax.get_yaxis_transform(), fontsize=7,
                            va="bottom", color="gray")
            label_axes(ax, "rank r", name, f"{name} vs LoRA rank")
            ax.legend(fontsize=7)
            written["metric_vs_rank"] = save_figure(fig, out / "metric_vs_rank.png", DPI)
    return written


def intrinsic_plot(points: list[dict[str, Any]], reference: float, metric: str, d90: int | None,
                   path: Path) -> dict[str, Path]:
    """The intrinsic-dimension curve: metric vs d (log x), the full fine-tuning reference and
    its 90% line, and d90 marked."""
    plt = pyplot()
    if plt is None or not points:
        return {}
    points = sorted(points, key=lambda p: p["d"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([p["d"] for p in points], [p["value"] for p in points], marker="o", label="subspace training")
    ax.axhline(reference, color="gray", linestyle="--", label=f"full fine-tuning ({reference:.4f})")
    ax.axhline(0.9 * reference, color="gray", linestyle=":", label="90% of full")
    if d90 is not None:
        ax.axvline(d90, color="red", linewidth=1, label=f"d90 = {d90}")
    ax.set_xscale("log")
    label_axes(ax, "subspace dimension d", metric, "intrinsic dimension")
    ax.legend(fontsize=8)
    return {"plot": save_figure(fig, path, DPI)}


def heatmap(matrix, path: Path, title: str, xlabel: str, ylabel: str, xticks=None, yticks=None) -> dict[str, Path]:
    """A heat map of a 2-D array (values 0..1, e.g. subspace similarities)."""
    plt = pyplot()
    if plt is None:
        return {}
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0, origin="lower", aspect="auto")
    fig.colorbar(image, ax=ax)
    if xticks is not None:
        ax.set_xticks(range(len(xticks)), [str(t) for t in xticks], fontsize=7)
    if yticks is not None:
        ax.set_yticks(range(len(yticks)), [str(t) for t in yticks], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    return {"heatmap": save_figure(fig, path, DPI)}
