"""The loop against independent references: a plain PyTorch loop, a real kill and resume, and
two DDP processes against one process with the same global batch."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import deltatune as dt
from deltatune.train import train
from deltatune.train.callbacks import read_records
from tests.train.conftest import ROOT, read_json

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _evals(run: Path) -> list[tuple]:
    return [(e["step"], e["accuracy"], e["loss"]) for e in read_records(run / "metrics.jsonl") if e["kind"] == "eval"]


def test_loop_equals_a_plain_pytorch_loop(recipe, toy_models, sentiment_files):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed

    r = recipe(model="bert-nodrop", train={"max_steps": 4, "group_by_length": False, "schedule": "constant",
                                           "max_grad_norm": None, "eval_every": None})
    train(r, quiet=True)

    set_seed(0)
    path = toy_models["bert-nodrop"]
    tok = AutoTokenizer.from_pretrained(path)
    model = dt.attach(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2),
                      dt.LoraConfig(r=4, alpha=8, targets=["q", "v"]))
    with open(sentiment_files["train"], newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.0)
    collate = DataCollatorWithPadding(tok)
    model.train()
    for step in range(4):
        idx = order[step * 16:(step + 1) * 16]
        features = [{**tok(rows[i]["sentence"], truncation=True, max_length=32), "label": int(rows[i]["label"])}
                    for i in idx]
        model(**collate(features)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    ours = _adapter(Path(r["output_dir"]))
    ref = {k: v.detach() for k, v in dt.core.state.adapter_tensors(model, "default").items()}
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], atol=1e-6, rtol=1e-5)


def _write(recipe_dict: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(recipe_dict))
    return path


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deltatune", *args], env=ENV, capture_output=True, text=True,
                          timeout=600, **kw)


def test_killed_run_resumes_to_the_same_result(recipe, tmp_path):
    # toy BERT with dropout: the resumed run must also restore the RNG to match
    settings = {"epochs": 10, "batch_size": 16, "eval_every": 12, "checkpoint_every": 4, "log_every": 4}
    ref = _write(recipe(output_dir=str(tmp_path / "ref"), train=settings), tmp_path / "ref.yaml")
    run = _write(recipe(output_dir=str(tmp_path / "run"), train=settings), tmp_path / "run.yaml")
    done = _cli("train", str(ref), "--quiet")
    assert done.returncode == 0, done.stderr

    proc = subprocess.Popen([sys.executable, "-m", "deltatune", "train", str(run), "--quiet"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name.split("-")[1]) for p in ckpts.glob("step-*")] if ckpts.is_dir() else []
        if steps and max(steps) >= 20:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "summary.json").exists()

    again = _cli("train", str(run))
    assert again.returncode != 0 and "--resume" in again.stderr  # no silent restart over a killed run
    resumed = _cli("train", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert read_json(tmp_path / "run" / "summary.json")["resumed"] is True
    a, b = _adapter(tmp_path / "ref"), _adapter(tmp_path / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _evals(tmp_path / "run") == _evals(tmp_path / "ref")
    assert read_json(tmp_path / "run" / "summary.json")["metrics"] == read_json(tmp_path / "ref" / "summary.json")["metrics"]


def test_two_ddp_processes_equal_one_with_the_same_global_batch(recipe, tmp_path):
    settings = {"max_steps": 6, "eval_every": 3, "log_every": 1}
    single = recipe(model="bert-nodrop", output_dir=str(tmp_path / "one"), train={**settings, "batch_size": 8})
    ddp = recipe(model="bert-nodrop", output_dir=str(tmp_path / "two"), train={**settings, "batch_size": 4})
    path = _write(ddp, tmp_path / "ddp.yaml")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "deltatune", "train", str(path), "--quiet"],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    train(single, quiet=True)
    summary = read_json(tmp_path / "two" / "summary.json")
    assert summary["world_size"] == 2
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    one, two = _evals(tmp_path / "one"), _evals(tmp_path / "two")
    assert [(s, acc) for s, acc, _ in one] == [(s, acc) for s, acc, _ in two]
    assert [l for *_, l in one] == pytest.approx([l for *_, l in two], abs=1e-5)
    losses = lambda run: [r["loss"] for r in read_records(run / "metrics.jsonl") if r["kind"] == "train"]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
