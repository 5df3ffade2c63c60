"""Recipes: the built-in ones parse, bad keys and values fail with messages that say the fix,
and --set overrides reach the right field with the right type."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from deltatune.core import registry
from deltatune.errors import ConfigError
from deltatune.train import recipe as rc
from deltatune.train.methods import AdapterMethod, resolve


def test_seed_recipes_ship_with_the_package():
    assert {"sst2-lora", "sst2-full", "sst2-head-only", "shakespeare-qlora", "alpaca-lora"} <= set(rc.builtin_names())


@pytest.mark.parametrize("name", rc.builtin_names())
def test_every_builtin_recipe_parses_and_names_a_known_method(name):
    recipe = rc.load(name)
    assert recipe.task in rc.TASKS
    method = resolve(recipe.method)
    kind = recipe.method["type"]
    assert kind in registry.names()
    if isinstance(method, AdapterMethod):
        assert type(method.config).method == kind


def test_qlora_recipe_asks_for_a_4bit_base():
    recipe = rc.load("shakespeare-qlora")
    assert recipe.quantize["bits"] == 4 and recipe.task == "causal-lm"


def test_unknown_keys_list_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown recipe key modle; valid keys: model, task, data"):
        rc.from_dict({"modle": "minilm", "data": {"train": "x.tsv"}})
    with pytest.raises(ConfigError, match=r"unknown key learning_rate in train; valid keys: epochs, max_steps"):
        rc.from_dict({"data": {"train": "x.tsv"}, "train": {"learning_rate": 1e-3}})
    with pytest.raises(ConfigError, match=r"unknown lora option rank in method; valid options: .*\br\b"):
        resolve({"type": "lora", "rank": 8})
    with pytest.raises(ConfigError, match=r"unknown method type 'lorra'; available: .*lora"):
        resolve({"type": "lorra"})


@pytest.mark.parametrize("key, data", [
    ("modle", {"modle": "minilm"}),
    ("train.learning_rate", {"train": {"learning_rate": 1e-3}}),
    ("data.maxlen", {"data": {"train": "x.tsv", "maxlen": 8}}),
    ("base_dir", {"base_dir": "."}),
])
def test_a_dotted_key_is_checked_like_the_recipe_data(key, data):
    with pytest.raises(ConfigError) as in_data:
        rc.from_dict({"data": {"train": "x.tsv"}, **data})
    with pytest.raises(ConfigError) as for_key:
        rc.check_key(key)
    assert str(for_key.value) == str(in_data.value)


def test_dotted_keys_reach_fields_and_method_options_only():
    for key in ("model", "train", "train.lr", "data.max_length", "method", "method.r", "method.any.depth",
                "quantize.bits"):
        rc.check_key(key)
    with pytest.raises(ConfigError, match="^output_dir is a value, not a section, so output_dir.x is not a recipe key$"):
        rc.check_key("output_dir.x")
    with pytest.raises(ConfigError, match="^train.lr is a value, not a section"):
        rc.check_key("train.lr.x")


def test_values_are_checked_and_coerced():
    r = rc.from_dict({"data": {"train": "x.tsv", "max_length": "64"}, "train": {"lr": "5e-4", "epochs": 2.0,
                                                                                "tensorboard": "false"}})
    assert r.train.lr == 5e-4 and isinstance(r.train.lr, float)
    assert r.train.epochs == 2 and isinstance(r.train.epochs, int)
    assert r.data.max_length == 64 and r.train.tensorboard is False
    with pytest.raises(ConfigError, match="train.schedule must be one of linear, cosine, constant"):
        rc.from_dict({"data": {"train": "x.tsv"}, "train": {"schedule": "step"}})
    with pytest.raises(ConfigError, match="train.batch_size should be int"):
        rc.from_dict({"data": {"train": "x.tsv"}, "train": {"batch_size": "many"}})
    with pytest.raises(ConfigError, match="names no training data"):
        rc.from_dict({"model": "minilm"})
    with pytest.raises(ConfigError, match="task must be one of"):
        rc.from_dict({"task": "qa", "data": {"train": "x.tsv"}})


def test_overrides_set_nested_values_with_yaml_types():
    data = rc.apply_overrides({"train": {"lr": 1e-4}, "method": {"type": "lora"}},
                              ["train.lr=1e-3", "method.targets=[q, k]", "train.max_steps=7", "output_dir=out/x"])
    r = rc.from_dict({**data, "data": {"train": "x.tsv"}})
    assert r.train.lr == 1e-3 and r.train.max_steps == 7 and r.output_dir == "out/x"
    assert r.method == {"type": "lora", "targets": ["q", "k"]}
    with pytest.raises(ConfigError, match="--set expects key.sub=value"):
        rc.apply_overrides({}, ["train.lr"])


def test_overrides_apply_in_order_and_name_a_key_that_is_no_section():
    data = rc.apply_overrides({"method": {"type": "lora"}}, ["method.r=4", "method={type: full}", "method.r=8"])
    assert data["method"] == {"type": "full", "r": 8}
    with pytest.raises(ConfigError, match="^--set model.name: model is not a section$"):
        rc.apply_overrides({"model": "minilm"}, ["model.name=x"])


def test_set_keys_copies_and_keeps_types():
    data = {"train": {"lr": 1.0}, "method": {"type": "lora", "r": 8}}
    targets = ["q", "v"]
    out = rc.set_keys(data, [("train.lr", 5e-05), ("method.targets", targets), ("data.max_length", 16),
                             ("method", {"type": "ia3"})])
    assert out == {"train": {"lr": 5e-05}, "method": {"type": "ia3"}, "data": {"max_length": 16}}
    assert data == {"train": {"lr": 1.0}, "method": {"type": "lora", "r": 8}}
    assert isinstance(out["train"]["lr"], float)
    out = rc.set_keys(data, [("method.targets", targets)])
    targets.append("k")
    assert out["method"]["targets"] == ["q", "v"]  # a copy of the value, not the caller's list
    with pytest.raises(ConfigError, match="^recipe key train.lr.x: lr is not a section$"):
        rc.set_keys(data, [("train.lr.x", 1)])


def test_recipe_file_and_builtin_name_errors(tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor a built-in recipe"):
        rc.load(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        rc.load(str(bad))


def test_resolved_recipe_round_trips_through_yaml(tmp_path):
    r = rc.load("sst2-lora", ["train.lr=2e-3"])
    again = rc.from_dict(__import__("yaml").safe_load(r.to_yaml()))
    assert dataclasses.asdict(again.train) == dataclasses.asdict(r.train)
    assert again.method == r.method and again.data.train == r.resolve_path(r.data.train)
    assert again.data.train.endswith("shared/data/sst2/train.tsv") and ".." not in again.data.train


def test_method_options_written_as_yaml_text_are_read_as_numbers():
    # YAML 1.1 reads 5e-2 (no dot) as text; numeric options take it as the number it spells
    section = yaml.safe_load("{type: lora, r: 8, alpha: 1e1, dropout: 5e-2, targets: [q, v]}")
    assert section["dropout"] == "5e-2"
    method = resolve(section)
    assert isinstance(method, AdapterMethod)
    assert method.config.dropout == 0.05 and method.config.alpha == 10.0 and method.config.targets == ("q", "v")
    with pytest.raises(ConfigError, match="method.dropout should be float.*'lots'"):
        resolve({"type": "lora", "dropout": "lots"})


def test_overrides_reach_a_method_given_by_name_and_odd_keys_get_the_usual_message():
    data = {"model": "minilm", "task": "seq-cls", "data": {"train": "t.tsv"}, "method": "lora"}
    built = rc.load(data, ["method.r=4"])
    assert built.method == {"type": "lora", "r": 4}
    with pytest.raises(ConfigError, match="unknown key 3 in train; valid keys: epochs"):
        rc.load({**data, "train": {3: "x", "lr": 1e-3}})
