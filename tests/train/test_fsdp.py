"""FSDP2 sharded training (``train.distributed: fsdp``) against one process: two gloo processes
on the CPU, launched by torchrun (and by ``accelerate launch``), must give the losses and the
adapter of a single process with the same global batch, while each holds about half of the
model's parameter bytes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltatune.train import train
from deltatune.train.callbacks import read_records
from tests.train.conftest import read_json
from tests.train.test_reference import ENV, _adapter, _evals, _write

SETTINGS = {"max_steps": 6, "eval_every": 3, "log_every": 1}


def _launch(recipe_path: Path, *extra: str, launcher: str = "torchrun") -> None:
    if launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    else:
        head = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    done = subprocess.run([*head, "-m", "deltatune", "train", str(recipe_path), "--quiet", *extra],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_records(run / "metrics.jsonl") if r["kind"] == "train"]


def _assert_same_run(run: Path, ref: Path) -> None:
    a, b = _adapter(ref), _adapter(run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    assert _losses(run) == pytest.approx(_losses(ref), abs=1e-5)
    assert [e[:2] for e in _evals(run)] == [e[:2] for e in _evals(ref)]
    assert [e[2] for e in _evals(run)] == pytest.approx([e[2] for e in _evals(ref)], abs=1e-5)


def test_fsdp_on_two_processes_equals_one_process_and_holds_half_the_weights(recipe, tmp_path):
    single = recipe(model="bert-nodrop", output_dir=str(tmp_path / "one"), train={**SETTINGS, "batch_size": 8})
    sharded = recipe(model="bert-nodrop", output_dir=str(tmp_path / "fsdp"),
                     train={**SETTINGS, "batch_size": 4, "distributed": "fsdp"})
    _launch(_write(sharded, tmp_path / "fsdp.yaml"))
    one = train(single, quiet=True)
    _assert_same_run(tmp_path / "fsdp", tmp_path / "one")
    summary = read_json(tmp_path / "fsdp" / "summary.json")
    assert summary["world_size"] == 2 and summary["distributed"] == "fsdp"
    whole = one["parameter_bytes_per_process"][0]
    per_process = summary["parameter_bytes_per_process"]
    assert len(per_process) == 2 and sum(per_process) == pytest.approx(whole, rel=0.01)
    for held in per_process:  # measured from each process's local shards
        assert held == pytest.approx(whole / 2, rel=0.02)
