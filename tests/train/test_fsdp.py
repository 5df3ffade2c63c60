"""FSDP2 sharded training (``train.distributed: fsdp``) against one process: two gloo processes
on the CPU, launched by torchrun (or ``accelerate launch``), must give the losses and the adapter
of a single process with the same global batch, while each holds about half of the model's
parameter bytes; the adapter they write loads in peft; a sharded run resumes from its checkpoint."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.errors import DeltatuneError
from deltatune.train import train
from deltatune.train.callbacks import read_records
from tests.train.conftest import read_json
from tests.train.test_reference import ENV, _adapter, _evals, _write

SETTINGS = {"max_steps": 6, "eval_every": 3, "log_every": 1}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
# accelerate's multi-process launcher (its flag says GPU; without one it runs gloo on the CPU)
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]


def _launch(recipe_path: Path, *extra: str, launcher: list[str] = TORCHRUN) -> None:
    done = subprocess.run([*launcher, "-m", "deltatune", "train", str(recipe_path), "--quiet", *extra],
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


def _pair(recipe, tmp_path: Path, **changes) -> tuple[dict, dict]:
    """The same run as one process (batch 8) and as two sharded processes (batch 4 each)."""
    train_changes = changes.pop("train", {})
    single = recipe(model="bert-nodrop", output_dir=str(tmp_path / "one"),
                    train={**SETTINGS, **train_changes, "batch_size": 8}, **changes)
    sharded = recipe(model="bert-nodrop", output_dir=str(tmp_path / "fsdp"),
                     train={**SETTINGS, **train_changes, "batch_size": 4, "distributed": "fsdp"}, **changes)
    return single, sharded


def test_fsdp_on_two_processes_equals_one_process_and_holds_half_the_weights(recipe, toy_models, tmp_path):
    single, sharded = _pair(recipe, tmp_path)
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

    # the gathered adapter is an ordinary one: peft loads it and computes what deltatune does
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    ids = torch.randint(1000, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = dt.load(dt.load_model(toy_models["bert-nodrop"], quiet=True), str(tmp_path / "fsdp" / "adapter"))
    theirs = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(toy_models["bert-nodrop"]),
                                       str(tmp_path / "fsdp" / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["qlora-4bit", "ia3-grad-accum"])
def test_fsdp_trains_qlora_and_ia3_as_one_process_does(variant, recipe, tmp_path):
    # IA3 with two micro-batches per step: the first ones skip FSDP's gradient reduce-scatter
    changes = ({"quantize": {"bits": 4}} if variant == "qlora-4bit" else
               {"method": {"type": "ia3"}, "train": {"grad_accum": 2, "max_steps": 4, "eval_every": 2}})
    single, sharded = _pair(recipe, tmp_path, **changes)
    _launch(_write(sharded, tmp_path / "fsdp.yaml"))
    train(single, quiet=True)
    _assert_same_run(tmp_path / "fsdp", tmp_path / "one")


@pytest.mark.slow
def test_sharded_run_resumes_from_its_checkpoint_to_the_same_adapter(recipe, tmp_path):
    _, sharded = _pair(recipe, tmp_path, train={"checkpoint_every": 3, "eval_every": 2})
    path = _write(sharded, tmp_path / "fsdp.yaml")
    run = tmp_path / "fsdp"
    _launch(path)
    shutil.copytree(run, tmp_path / "whole")
    checkpoint = run / "checkpoints" / "step-0000003"
    assert (checkpoint / "trainable.safetensors").is_file()  # one gathered file, not a shard per process
    for name in ("adapter", "summary.json"):  # as if the run had died after its checkpoint
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    _launch(path, "--resume")
    assert read_json(run / "summary.json")["resumed"] is True
    _assert_same_run(run, tmp_path / "whole")

    # the gathered checkpoint also resumes on one process, with the same global batch
    for name in ("adapter", "summary.json"):
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    with pytest.raises(DeltatuneError, match="global batch of 8"):
        train(sharded, resume=True, quiet=True)
    one_process = {**sharded, "train": {**sharded["train"], "batch_size": 8, "distributed": "ddp"}}
    assert train(one_process, resume=True, quiet=True)["resumed"] is True
    _assert_same_run(run, tmp_path / "whole")


@pytest.mark.slow
def test_accelerate_launch_with_fsdp_equals_one_process(recipe, tmp_path):
    single, sharded = _pair(recipe, tmp_path)
    sharded["train"]["distributed"] = "ddp"  # accelerate's --use_fsdp asks for the sharding
    with socket.socket() as probe:  # a free port: other test runs may share this machine
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    _launch(_write(sharded, tmp_path / "fsdp.yaml"), launcher=[*ACCELERATE, "--main_process_port", port, "--use_fsdp"])
    assert read_json(tmp_path / "fsdp" / "summary.json")["distributed"] == "fsdp"
    train(single, quiet=True)
    _assert_same_run(tmp_path / "fsdp", tmp_path / "one")


def test_fsdp_refuses_what_it_cannot_shard_and_deepspeed_launches(toy_models, monkeypatch):
    from deltatune.errors import ConfigError
    from deltatune.train import fsdp
    from deltatune.train.distributed import Dist

    model = dt.quantize(dt.load_model(toy_models["bert-nodrop"], quiet=True), bits=8)
    with pytest.raises(ConfigError, match="Int8Params.*4-bit"):
        fsdp.shard(model, Dist(0, 2))
    with pytest.raises(ConfigError, match="adamw8bit"):
        fsdp.check_optimizer("adamw8bit")
    assert fsdp.strategy("ddp") == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert fsdp.strategy("ddp") == "fsdp"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="FSDP2"):
        fsdp.strategy("fsdp")
