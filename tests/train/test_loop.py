"""The training loop on tiny models: it learns, it is reproducible, gradient accumulation equals
the big batch, early stopping and best-weights restore behave, and every task trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune.errors import ConfigError, DeltatuneError
from deltatune.train import train
from deltatune.train.callbacks import read_records
from deltatune.train.evaluate import evaluate
from tests.train.conftest import read_json


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_training_writes_every_output(recipe):
    r = recipe(train={"epochs": 2, "eval_every": 6, "log_every": 3, "restore_best": False, "eval_on_start": True})
    summary = train(r, quiet=True)
    out = Path(r["output_dir"])
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl",
                 "summary.json", "loss.png", "recipe.yaml"):
        assert (out / name).is_file(), name
    assert read_json(out / "summary.json") == summary
    records = read_records(out / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    trains = [r for r in records if r["kind"] == "train"]
    assert [e["step"] for e in evals] == [0, 6, 12, 18, 24] and summary["steps"] == 24
    assert [t["step"] for t in trains] == list(range(3, 25, 3))
    assert all({"loss", "lr", "tokens_per_s", "epoch"} <= set(t) for t in trains)
    assert summary["metrics"] == {k: v for k, v in evals[-1].items() if k not in ("kind", "step", "epoch")}
    assert summary["trainable_params"] < summary["total_params"] / 10
    assert summary["peak_memory_mb"] > 0 and summary["precision"] == "fp32"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_minilm_learns_sst2_from_the_packaged_sample(tmp_path):
    from deltatune.train.demo import demo_recipe

    r = demo_recipe(str(tmp_path / "demo"))
    r["train"].update({"epochs": 1, "max_steps": 40, "batch_size": 16, "lr": 2e-3, "schedule": "constant",
                       "warmup": 0, "eval_every": None})
    summary = train(r, quiet=True)
    evals = [e for e in read_records(tmp_path / "demo" / "metrics.jsonl") if e["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    assert evals[-1]["accuracy"] > evals[0]["accuracy"] + 0.1, evals
    assert summary["metrics"]["accuracy"] == evals[-1]["accuracy"]


def test_same_seed_same_result(recipe, tmp_path):
    first = train(recipe(output_dir=str(tmp_path / "a"), train={"max_steps": 6}), quiet=True)
    second = train(recipe(output_dir=str(tmp_path / "b"), train={"max_steps": 6}), quiet=True)
    assert first["metrics"] == second["metrics"]
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = train(recipe(output_dir=str(tmp_path / "c"), train={"max_steps": 6, "seed": 1}), quiet=True)
    assert not all(torch.equal(a[k], v) for k, v in _adapter(tmp_path / "c").items())
    assert other["steps"] == 6


def test_gradient_accumulation_equals_the_big_batch(recipe, tmp_path):
    big = recipe(model="bert-nodrop", output_dir=str(tmp_path / "big"), train={"batch_size": 16, "max_steps": 5})
    small = recipe(model="bert-nodrop", output_dir=str(tmp_path / "acc"),
                   train={"batch_size": 8, "grad_accum": 2, "max_steps": 5, "group_by_length": False})
    big["train"]["group_by_length"] = False
    train(big, quiet=True)
    train(small, quiet=True)
    a, b = _adapter(tmp_path / "big"), _adapter(tmp_path / "acc")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_pieces_of_similar_length_train_as_the_whole_batch(recipe, tmp_path, monkeypatch):
    from deltatune.train import loop

    whole = recipe(model="bert-nodrop", output_dir=str(tmp_path / "whole"),
                   train={"batch_size": 16, "max_steps": 4, "split_by_length": False})
    train(whole, quiet=True)
    pieces_run: list[int] = []
    cut = loop.length_pieces

    def every_length_apart(batch, lengths):  # cut at every distinct length: the most pieces
        pieces = cut(batch, lengths, piece_cost=0)
        pieces_run.append(len(pieces))
        return pieces

    monkeypatch.setattr(loop, "length_pieces", every_length_apart)
    split = recipe(model="bert-nodrop", output_dir=str(tmp_path / "split"),
                   train={"batch_size": 16, "max_steps": 4, "padding_free": False})
    train(split, quiet=True)
    assert len(pieces_run) == 4 and min(pieces_run) > 2
    a, b = _adapter(tmp_path / "whole"), _adapter(tmp_path / "split")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_padding_free_training_gives_the_padded_batches_adapter(recipe, tmp_path):
    padded = recipe(model="bert-nodrop", output_dir=str(tmp_path / "padded"),
                    train={"batch_size": 16, "max_steps": 4, "padding_free": False, "split_by_length": False})
    packed = recipe(model="bert-nodrop", output_dir=str(tmp_path / "packed"), train={"batch_size": 16, "max_steps": 4})
    assert train(padded, quiet=True)["padding_free"] is False
    summary = train(packed, quiet=True)
    assert summary["padding_free"] is True
    a, b = _adapter(tmp_path / "padded"), _adapter(tmp_path / "packed")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_a_model_packing_cannot_reproduce_trains_padded_with_a_warning(recipe, tmp_path, monkeypatch):
    from deltatune.train import packing

    monkeypatch.setattr(packing.Packer, "verify", lambda self, batch: "its attention mixes sequences (made up)")
    r = recipe(model="bert-nodrop", output_dir=str(tmp_path / "refused"), train={"batch_size": 16, "max_steps": 2})
    with pytest.warns(UserWarning, match="padding-free training is off for this model: its attention mixes"):
        summary = train(r, quiet=True)
    assert summary["padding_free"] is False and summary["steps"] == 2


def test_early_stopping_and_best_weights_restore(recipe, sentiment_files):
    r = recipe(train={"epochs": 6, "lr": 0.3, "eval_every": 2, "patience": 2, "best_metric": "loss"})
    summary = train(r, quiet=True)
    out = Path(r["output_dir"])
    evals = [e for e in read_records(out / "metrics.jsonl") if e["kind"] == "eval" and e["step"] > 0]
    best = min(evals, key=lambda e: e["loss"])
    assert summary["best"] == {"step": best["step"], "metric": "loss", "value": best["loss"]}
    assert summary["stopped_early"] and summary["steps"] < 6 * 12
    assert summary["steps"] == evals[-1]["step"] and best["step"] != summary["steps"], "lr 0.3 should overshoot"
    # the saved adapter is the best one: evaluated independently it gives the best metrics
    again = evaluate(sentiment_files["eval"], adapter=str(out / "adapter"))
    assert again["accuracy"] == best["accuracy"]
    assert again["loss"] == pytest.approx(best["loss"], abs=1e-5)


def test_full_and_head_only_baselines(recipe, toy_models, tmp_path):
    import deltatune as dt

    head = train(recipe(output_dir=str(tmp_path / "head"), method={"type": "head-only"}, train={"max_steps": 4}),
                 quiet=True)
    full = train(recipe(output_dir=str(tmp_path / "full"), method={"type": "full"}, train={"max_steps": 4,
                                                                                          "lr": 1e-3}), quiet=True)
    base_params = sum(p.numel() for p in dt.load_model(toy_models["bert"]).parameters())
    assert head["trainable_params"] == 32 * 2 + 2  # the classifier: weight and bias
    assert full["trainable_params"] == base_params
    assert Path(head["result"]).exists() and Path(full["result"]).exists()


def test_clear_errors_for_bad_runs(recipe, tmp_path):
    with pytest.raises(ConfigError, match=r"data file .*nope\.tsv does not exist"):
        train(recipe(data={"train": str(tmp_path / "nope.tsv")}), quiet=True)
    with pytest.raises(ConfigError, match="best_metric 'bleu' is not an evaluation metric"):
        train(recipe(train={"best_metric": "bleu"}), quiet=True)
    r = recipe(train={"max_steps": 2})
    train(r, quiet=True)
    with pytest.raises(ConfigError, match="holds a previous run .* --resume .* --overwrite"):
        train(r, quiet=True)
    assert train(r, overwrite=True, quiet=True)["steps"] == 2


def test_qlora_recipe_runs_or_says_why(recipe):
    r = recipe(quantize={"bits": 4}, train={"max_steps": 1})
    try:
        summary = train(r, quiet=True)
    except DeltatuneError as exc:  # no bitsandbytes / dt.quantize here: a clear message, not a crash
        assert "quantiz" in str(exc) or "bitsandbytes" in str(exc)
    else:
        assert summary["steps"] == 1


@pytest.mark.parametrize("model,task,data", [
    ("gpt2", "causal-lm", "text"), ("llama-chat", "causal-lm", "instruction"),
    ("t5", "seq2seq", "pairs"), ("bert", "token-cls", "tags")])
def test_every_task_trains(model, task, data, recipe, tmp_path):
    import json
    rows = {
        "text": [{"text": "the cat sat on the mat and the dog sat on the log " * 3}] * 12,
        "instruction": [{"instruction": "repeat", "input": f"word {i}", "output": f"word {i}"} for i in range(24)],
        "pairs": [{"source": f"say {i}", "target": f"said {i}"} for i in range(24)],
        "tags": [{"tokens": ["the", "cat", "sat", str(i)], "tags": ["O", "N", "V", "O"]} for i in range(24)],
    }[data]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fields = {"pairs": {"text": "source", "label": "target"},
              "tags": {"text": "tokens", "label": "tags"}}.get(data, {"text": "text"})
    r = recipe(model=model, task=task, data={"train": str(path), "eval": None, "eval_fraction": 0.25,
                                             "block_size": 16, **fields},
               train={"epochs": 3, "batch_size": 4, "lr": 1e-2, "eval_every": None, "eval_on_start": True})
    summary = train(r, quiet=True)
    evals = [e for e in read_records(Path(r["output_dir"]) / "metrics.jsonl") if e["kind"] == "eval"]
    assert evals[-1]["loss"] < evals[0]["loss"], evals
    if task in ("causal-lm", "seq2seq"):
        assert summary["metrics"]["perplexity"] == pytest.approx(torch.tensor(summary["metrics"]["loss"]).exp().item(),
                                                                 rel=1e-4)


@pytest.mark.slow  # torch.compile takes about a minute on a 2-core CPU, even for the toy
def test_compiled_training_equals_eager_training(recipe, tmp_path):
    eager = recipe(model="bert-nodrop", output_dir=str(tmp_path / "eager"), train={"max_steps": 3})
    compiled = recipe(model="bert-nodrop", output_dir=str(tmp_path / "compiled"),
                      train={"max_steps": 3, "compile": True})
    from torch._dynamo.utils import counters

    first = train(eager, quiet=True)
    counters.clear()
    second = train(compiled, quiet=True)
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled run really went through dynamo
    a, b = _adapter(tmp_path / "eager"), _adapter(tmp_path / "compiled")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert second["metrics"]["loss"] == pytest.approx(first["metrics"]["loss"], abs=1e-5)
