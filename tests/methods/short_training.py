"""A short, fixed-budget fine-tune of the embedded MiniLM on real SST-2 sentences, for the test
that every method actually learns (accuracy after > accuracy before)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import deltatune as dt

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sst2"


@dataclass(frozen=True)
class ShortRun:
    accuracy_before: float
    accuracy_after: float
    trainable: int


def sst2_rows(split: str, n: int) -> list[tuple[str, int]]:
    """The first ``n`` rows of ../shared/data/sst2/{split}.tsv; skips the test when absent."""
    path = DATA / f"{split}.tsv"
    if not path.is_file():
        pytest.skip(f"SST-2 data not found at {path} (the shared data folder is absent)")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(row["sentence"], int(row["label"])) for _, row in zip(range(n), reader)]


def _accuracy(model, tokenizer, rows, batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            enc = tokenizer([s for s, _ in chunk], padding=True, truncation=True, max_length=64, return_tensors="pt")
            pred = model(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor([y for _, y in chunk])).sum())
    return correct / len(rows)


def train_briefly(config: dt.MethodConfig, *, steps: int = 60, lr: float = 3e-3, batch_size: int = 16,
                  train_rows: int = 960, eval_rows: int = 200, seed: int = 0) -> ShortRun:
    """Attach ``config`` to MiniLM, measure dev accuracy, train ``steps`` AdamW steps, measure again."""
    torch.manual_seed(seed)
    train, dev = sst2_rows("train", train_rows), sst2_rows("dev", eval_rows)
    tokenizer = dt.load_tokenizer("minilm")
    model = dt.attach(dt.load_model("minilm", num_labels=2), config)
    before = _accuracy(model, tokenizer, dev)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model.train()
        idx = torch.randint(0, len(train), (batch_size,), generator=g).tolist()
        enc = tokenizer([train[i][0] for i in idx], padding=True, truncation=True, max_length=64, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([train[i][1] for i in idx])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return ShortRun(before, _accuracy(model, tokenizer, dev), model.parameter_counts()[0])
