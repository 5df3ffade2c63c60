"""What a run reports while it trains: a progress bar on a terminal (plain log lines
otherwise), ``metrics.jsonl``, optional TensorBoard logs, and ``loss.png`` at the end (with
the matplotlib set-up the experiment plots share: :func:`pyplot`, :func:`label_axes`,
:func:`save_figure`)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TextIO

from deltatune.errors import ConfigError
from deltatune.train.files import write_atomic, write_text


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Steps, loss and ETA: a tqdm bar when ``stream`` is a terminal, else a line every
    ``log_every`` steps (what a log file or CI wants)."""

    def __init__(self, total: int, start: int, log_every: int, stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.total, self.start, self.log_every, self.enabled = total, start, log_every, enabled
        self.began = time.perf_counter()
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=start, file=self.stream, unit="step", dynamic_ncols=True)

    def step(self, step: int, loss: float, lr: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            return
        if step % self.log_every == 0 or step == self.total:
            done = step - self.start
            rate = done / max(time.perf_counter() - self.began, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else 0.0
            self.write(f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | "
                       f"{rate:.2f} steps/s | eta {_duration(eta)}")

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step or evaluation."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        self.fh = None

    def rewind(self, step: int) -> None:
        """Keep only records up to ``step`` (a resumed run drops what came after its checkpoint,
        including a last line a kill cut short)."""
        if not self.enabled:
            return
        kept = [line for line in read_records(self.path) if line.get("step", 0) <= step]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.fh is None:
            self.fh = self.path.open("a", encoding="utf-8")
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def read_records(path: Path) -> list[dict]:
    """The complete records of a metrics.jsonl file (a torn last line is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class TensorBoard:
    """Scalars to ``output_dir/tensorboard`` (needs the ``tensorboard`` package)."""

    def __init__(self, folder: Path, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(str(folder), purge_step=purge_step)

    def write(self, record: dict) -> None:
        prefix = "eval/" if record.get("kind") == "eval" else "train/"
        for key, value in record.items():
            if key not in ("step", "kind", "epoch") and isinstance(value, (int, float)):
                self.writer.add_scalar(prefix + key, value, record["step"])

    def close(self) -> None:
        self.writer.close()


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display needed), or ``None``
    when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    """The labels, title and light grid every deltatune plot has."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)


def save_figure(fig, target: Path, dpi: float | None = None) -> Path:
    """Lay out ``fig``, write it to ``target`` as PNG (atomically; ``dpi`` default: the
    figure's) and close it; returns ``target``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    write_atomic(target, lambda p: fig.savefig(p, format="png", dpi=dpi))
    plt.close(fig)
    return target


def plot_losses(records: list[dict], target: Path, title: str = "") -> bool:
    """Draw training loss (and evaluation metrics) against the step into ``target`` (PNG).
    Returns False when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    metrics = [k for k in ("accuracy", "f1", "perplexity") if any(k in r for r in evals)][:1]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", lw=1.5, label="eval loss")
    label_axes(ax, "optimizer step", "loss", title)
    handles, labels = ax.get_legend_handles_labels()
    if metrics:
        right = ax.twinx()
        key = metrics[0]
        right.plot([r["step"] for r in evals if key in r], [r[key] for r in evals if key in r],
                   "s--", color="tab:green", lw=1.5, label=f"eval {key}")
        right.set_ylabel(key)
        h2, l2 = right.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:  # below the axes: inside, "best" only avoids the left axis' curves and covers the others
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(handles),
                  frameon=False)
    save_figure(fig, target)
    return True
