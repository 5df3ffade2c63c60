"""Adapter folders that are broken, foreign or do not fit; atomic saves; several adapters on one
model; generate() with an adapter.

A failed load must raise a deltatune error (never a raw torch/safetensors one) and leave the model
exactly as it was: same adapters, same active ones, same modules, same outputs.
"""

from __future__ import annotations

import copy
import json
import re
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from tests.toy_models import (TOYS, assert_differs, assert_same, is_head_copy, is_lora_param, logits, lora_paths,
                              module_types, randomize)

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
BERT = TOYS["bert"]


def bert_adapter(r: int = 8, targets=("q", "v"), seed: int = 0) -> dt.AdaptedModel:
    torch.manual_seed(seed)
    model = dt.attach(BERT.base(), dt.LoraConfig(r=r, alpha=16, init="random", targets=list(targets)))
    return randomize(model, only=is_head_copy, seed=seed).eval()


@pytest.fixture
def folder(tmp_path) -> Path:
    """A valid r=8 BERT adapter folder, to be damaged by the test."""
    bert_adapter().save(tmp_path / "adapter")
    return tmp_path / "adapter"


# --- damaged and foreign folders -------------------------------------------------------------

def _edit_config(folder: Path, **changes) -> None:
    data = json.loads((folder / CONFIG).read_text())
    data.update(changes)
    (folder / CONFIG).write_text(json.dumps(data))


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS))


def _pickled_only(folder: Path) -> None:
    torch.save(load_file(str(folder / WEIGHTS)), folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()


def _truncate(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def _drop_one_lora_b(tensors: dict) -> None:
    del tensors[next(k for k in sorted(tensors) if k.endswith("lora_B.weight"))]


def _add_stray(tensors: dict) -> None:
    tensors["base_model.model.bert.encoder.layer.0.attention.self.key.lora_A.weight"] = torch.zeros(8, 32)


#: name -> (how to damage a valid folder, the error expected, a phrase the message must contain)
BREAKAGES = {
    "missing-folder": (shutil.rmtree, dt.AdapterFileError, "does not exist"),
    "missing-config": (lambda f: (f / CONFIG).unlink(), dt.AdapterFileError, CONFIG),
    "missing-weights": (lambda f: (f / WEIGHTS).unlink(), dt.AdapterFileError, WEIGHTS),
    "pickled-bin-only": (_pickled_only, dt.AdapterFileError, "adapter_model.bin"),
    "truncated-weights": (_truncate, dt.AdapterFileError, WEIGHTS),
    "weights-not-safetensors": (lambda f: (f / WEIGHTS).write_bytes(b"PK\x03\x04 not a tensor file" * 8),
                                dt.AdapterFileError, WEIGHTS),
    "empty-weights": (lambda f: (f / WEIGHTS).write_bytes(b""), dt.AdapterFileError, WEIGHTS),
    "garbage-json": (lambda f: (f / CONFIG).write_text('{"r": 8, "lora_alpha": '), dt.AdapterFileError, CONFIG),
    "json-not-an-object": (lambda f: (f / CONFIG).write_text("[8, 16]"), dt.AdapterFileError, CONFIG),
    "rank-mismatch": (lambda f: _edit_config(f, r=4), dt.AdapterFileError, "(8, 32)"),
    "missing-tensor": (lambda f: _edit_tensors(f, _drop_one_lora_b), dt.AdapterFileError, "lora_B"),
    "stray-tensor": (lambda f: _edit_tensors(f, _add_stray), dt.AdapterFileError, "attention.self.key"),
    "foreign-target": (lambda f: _edit_config(f, target_modules=["q_proj"]), dt.TargetError, "q_proj"),
    "unknown-peft-type": (lambda f: _edit_config(f, peft_type="NOT_A_METHOD"), dt.DeltatuneError, "NOT_A_METHOD"),
    "invalid-rank-in-config": (lambda f: _edit_config(f, r=0), dt.ConfigError, "r"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_bad_folder_raises_and_leaves_a_fresh_base_untouched(folder, breakage):
    damage, error, phrase = BREAKAGES[breakage]
    damage(folder)
    base = BERT.base()
    with pytest.raises(error) as err:
        dt.load(base, folder)
    assert phrase in str(err.value)
    assert module_types(base) == module_types(BERT.base())
    assert_same(logits(base, BERT.batch()), logits(BERT.base(), BERT.batch()))


def _snapshot(model: dt.AdaptedModel) -> dict:
    return {"names": model.adapter_names, "active": model.active_adapters, "types": module_types(model),
            "counts": model.parameter_counts(), "logits": logits(model, BERT.batch()),
            "grad": {n: p.requires_grad for n, p in model.named_parameters()}}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_failed_load_leaves_an_adapted_model_exactly_as_before(folder, tmp_path, breakage):
    damage, error, _ = BREAKAGES[breakage]
    model = bert_adapter(r=4, targets=["q", "k"], seed=3)
    model.save(tmp_path / "good")
    before = _snapshot(model)
    damage(folder)
    with pytest.raises(error):
        model.load(folder, name="second")
    after = _snapshot(model)
    assert_same(after.pop("logits"), before.pop("logits"))
    assert after == before
    model.load(tmp_path / "good", name="second")  # the name was not left taken
    assert model.adapter_names == ["default", "second"]
    assert model.active_adapters == ["default"], "a loaded second adapter must not become active by itself"


def test_rank_mismatch_names_the_layer_and_both_shapes(folder):
    _edit_config(folder, r=4)
    with pytest.raises(dt.AdapterFileError) as err:
        dt.load(BERT.base(), folder)
    message = str(err.value)
    assert re.search(r"bert\.encoder\.layer\.\d\.attention\.self\.(query|value)", message), message
    assert "(8, 32)" in message and "(4, 32)" in message


def test_pickled_adapter_is_never_unpickled(folder, monkeypatch):
    _pickled_only(folder)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("deltatune called torch.load on an untrusted file")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(dt.AdapterFileError, match="adapter_model.bin"):
        dt.load(BERT.base(), folder)


def test_loading_under_a_taken_name_is_an_adapter_error(folder):
    model = bert_adapter(r=4, seed=3)
    before = logits(model, BERT.batch())
    with pytest.raises(dt.AdapterError, match="default"):
        model.load(folder, name="default")
    assert model.adapter_names == ["default"]
    assert_same(logits(model, BERT.batch()), before)


@pytest.mark.parametrize("field, value", [
    ("r", 0), ("r", 2.5), ("alpha", 0), ("alpha", -1), ("dropout", 1.0), ("dropout", -0.1), ("bias", "some"),
    ("init", "xavier"), ("rank_pattern", {"query": 0}), ("alpha_pattern", {"query": -2}), ("modules_to_save", [3]),
])
def test_invalid_config_values_are_config_errors(field, value):
    with pytest.raises(dt.ConfigError, match="rank" if field == "r" else re.escape(field)):
        dt.LoraConfig(**{field: value})


def test_configs_are_frozen_and_attach_wants_one():
    config = dt.LoraConfig(targets=["q", "v"])
    with pytest.raises(AttributeError):
        config.r = 16
    assert config.replace(r=16).r == 16 and config.r == 8
    with pytest.raises(dt.ConfigError):
        dt.attach(BERT.base(), {"r": 8})


# --- atomic saves ----------------------------------------------------------------------------

def _failing_writer(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\x00" * 64)  # half a file, then the disk is full
    raise OSError("No space left on device")


@pytest.fixture
def failing_safetensors(monkeypatch):
    """Make the safetensors writer fail midway, wherever deltatune's state module took it from."""
    import safetensors.torch
    from deltatune.core import state
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_writer)
    if hasattr(state, "save_file"):
        monkeypatch.setattr(state, "save_file", _failing_writer)


def test_a_failed_save_keeps_the_earlier_adapter_in_the_folder_intact(tmp_path, request):
    first = bert_adapter(seed=1)
    first.save(tmp_path)
    expected = logits(first, BERT.batch())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    request.getfixturevalue("failing_safetensors")
    with pytest.raises(OSError):
        bert_adapter(r=2, targets=["k"], seed=2).save(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before, "files changed or temp files left"
    assert_same(logits(dt.load(BERT.base(), tmp_path).eval(), BERT.batch()), expected)


def test_a_failed_save_into_a_new_folder_leaves_no_adapter_files(tmp_path, failing_safetensors):
    with pytest.raises(OSError):
        bert_adapter().save(tmp_path / "new")
    assert not (tmp_path / "new").exists() or list((tmp_path / "new").iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_and_folders_get_the_permissions_the_umask_gives(tmp_path, umask):
    from deltatune.train.files import replace_dir

    old = os.umask(umask)
    try:
        bert_adapter().save(tmp_path / "adapter")  # atomic file writes
        replace_dir(tmp_path / "run", lambda tmp: (tmp / "summary.json").write_text("{}"))
    finally:
        os.umask(old)
    for path in [*(tmp_path / "adapter").iterdir(), tmp_path / "run" / "summary.json"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o777 & ~umask


# --- several adapters on one model -----------------------------------------------------------

LLAMA = TOYS["llama"]
TWO = {"a": dt.LoraConfig(r=4, alpha=8, init="random", targets=["q", "v"]),
       "b": dt.LoraConfig(r=2, alpha=6, init="random", targets=["q", "o"])}


def two_adapters(toy) -> dt.AdaptedModel:
    model = dt.attach(toy.base(), TWO["a"], name="a")
    model.add(TWO["b"], name="b")
    return randomize(model.use(["a", "b"]), only=lambda n: is_head_copy(n)).eval()


def holding_only(toy, model: dt.AdaptedModel, name: str) -> dt.AdaptedModel:
    """A fresh model with just adapter ``name`` of ``model``, its tensors copied across by name."""
    single = dt.attach(toy.base(), TWO[name], name=name).eval()
    source = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in single.named_parameters():
            if is_lora_param(n) or is_head_copy(n):
                p.copy_(source[n])
    return single


@pytest.mark.parametrize("toy", [BERT, LLAMA], ids=["bert", "llama"])
def test_each_adapter_alone_equals_a_model_holding_only_it(toy):
    batch = toy.batch()
    model = two_adapters(toy)
    outputs = {}
    for name in ("a", "b"):
        model.use(name)
        assert model.active_adapters == [name]
        outputs[name] = logits(model, batch)
        assert_same(outputs[name], logits(holding_only(toy, model, name), batch))
    assert_differs(outputs["a"], outputs["b"])


def _hand_merged(toy, model: dt.AdaptedModel, names) -> torch.nn.Module:
    """The base model with W + sum over ``names`` of (alpha / r) B A written into each weight."""
    reference = toy.base()
    params = dict(model.base_model.named_parameters())
    with torch.no_grad():
        for name in names:
            cfg = TWO[name]
            for n, a in params.items():
                if n.endswith(f".lora_A.{name}.weight"):
                    path = n[: -len(f".lora_A.{name}.weight")]
                    b = params[f"{path}.lora_B.{name}.weight"]
                    reference.get_submodule(path).weight += cfg.alpha / cfg.r * b @ a
    return reference


def test_two_active_adapters_add_their_updates():
    batch = LLAMA.batch()
    model = two_adapters(LLAMA).use(["a", "b"])
    expected = logits(_hand_merged(LLAMA, model, ["a", "b"]), batch)
    assert_differs(expected, logits(_hand_merged(LLAMA, model, ["a"]), batch))
    assert_same(logits(model, batch), expected, atol=1e-5)
    model.merge()
    assert_same(logits(model, batch), expected, atol=1e-5)
    model.unmerge()
    model.use("b")
    assert_same(logits(model, batch), logits(_hand_merged(LLAMA, model, ["b"]), batch), atol=1e-5)


def test_only_the_active_trainable_adapter_gets_gradients():
    model = two_adapters(BERT).use("b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)
    assert any(is_head_copy(n) for n in trainable)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_removing_the_active_adapter_leaves_a_valid_state(merged):
    batch = LLAMA.batch()
    model = two_adapters(LLAMA).use("a")
    only_b = logits(holding_only(LLAMA, model, "b"), batch)
    if merged:
        model.merge()
    model.remove("a")
    assert model.adapter_names == ["b"] and model.active_adapters == ["b"]
    assert not any(".a." in n for n, _ in model.named_parameters())
    assert_same(logits(model, batch), only_b, atol=1e-5)

    model.remove("b")
    assert model.adapter_names == [] and model.active_adapters == []
    assert module_types(model.base_model) == module_types(LLAMA.base())
    assert_same(logits(model, batch), logits(LLAMA.base(), batch), atol=1e-5)
    with pytest.raises(dt.AdapterError, match="'a'"):
        model.use("a")


def test_saving_an_inactive_adapter_writes_that_adapter(tmp_path):
    batch = BERT.batch()
    model = two_adapters(BERT).use("a")
    model.save(tmp_path, adapter="b")
    assert model.active_adapters == ["a"]
    assert_same(logits(dt.load(BERT.base(), tmp_path).eval(), batch), logits(holding_only(BERT, model, "b"), batch))


def test_loading_an_adapter_with_trained_biases_leaves_the_other_adapter_unchanged(tmp_path):
    toy = TOYS["gpt2"]
    batch = toy.batch()
    config = dt.LoraConfig(r=4, alpha=8, init="random", targets=["q"], bias="lora_only")
    randomize(dt.attach(toy.base(), config), only=lambda n: not is_lora_param(n), seed=1).save(tmp_path)
    model = randomize(dt.attach(toy.base(), config, name="first"), only=lambda n: not is_lora_param(n), seed=2)
    expected = logits(model.eval(), batch)
    model.load(tmp_path, name="second")
    model.use("first")
    assert_same(logits(model, batch), expected)


def test_merge_and_unload_bakes_in_only_the_active_adapter():
    batch = LLAMA.batch()
    model = two_adapters(LLAMA).use("b")
    expected = logits(holding_only(LLAMA, model, "b"), batch)
    plain = model.merge_and_unload()
    assert module_types(plain) == module_types(LLAMA.base())
    assert_same(logits(plain, batch), expected, atol=1e-5)


def test_saving_while_merged_writes_the_same_adapter(tmp_path):
    batch = BERT.batch()
    model = bert_adapter()
    expected = logits(model, batch)
    model.merge()
    model.save(tmp_path)
    assert_same(logits(dt.load(BERT.base(), tmp_path).eval(), batch), expected, atol=1e-5)


@pytest.mark.parametrize("misuse", [
    lambda m: m.use("nope"),
    lambda m: m.use(["a", "nope"]),
    lambda m: m.remove("nope"),
    lambda m: m.add(TWO["a"], name="a"),
    lambda m: m.add(TWO["a"], name="has.dot"),
    lambda m: m.add(TWO["a"], name=dt.BASE_ADAPTER),
    lambda m: m.save("unused", adapter="nope"),
], ids=["use-unknown", "use-list-with-unknown", "remove-unknown", "duplicate-name", "dotted-name", "reserved-name",
        "save-unknown"])
def test_adapter_misuse_is_an_adapter_error_and_changes_nothing(misuse, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = two_adapters(LLAMA).use("b")
    before = (model.adapter_names, model.active_adapters, lora_paths(model))
    with pytest.raises(dt.AdapterError):
        misuse(model)
    assert (model.adapter_names, model.active_adapters, lora_paths(model)) == before
    assert list(tmp_path.iterdir()) == []


# --- generate --------------------------------------------------------------------------------

@pytest.mark.parametrize("toy", [TOYS["gpt2"], LLAMA], ids=["gpt2", "llama"])
def test_generate_with_an_adapter_equals_the_merged_model(toy):
    batch = toy.batch()
    model = dt.attach(toy.base(), dt.LoraConfig(r=4, alpha=8, init="random", targets="all-linear")).eval()
    assert_differs(logits(model, batch), logits(toy.base(), batch))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        tokens = model.generate(**batch, **kwargs)
        merged = copy.deepcopy(model).merge_and_unload()
        assert torch.equal(tokens, merged.generate(**batch, **kwargs))
        with model.disabled():
            assert torch.equal(model.generate(**batch, **kwargs), toy.base().generate(**batch, **kwargs))
    assert tokens.shape == (batch["input_ids"].shape[0], batch["input_ids"].shape[1] + 6)


def test_loading_skips_random_init_only_for_the_loaded_adapter(tmp_path):
    """Loading leaves new factors unfilled until the file's values arrive; an adapter added
    afterwards must still start from LoRA's own init (B zero: output equals the base)."""
    batch = BERT.batch()
    saved = bert_adapter()
    saved.save(tmp_path)
    model = dt.load(BERT.base(), tmp_path).eval()
    assert_same(logits(model, batch), logits(saved, batch))
    model.add(dt.LoraConfig(r=4, alpha=8, targets=["k"]), name="fresh")
    model.use("fresh")
    assert_same(logits(model, batch), logits(BERT.base().eval(), batch), atol=1e-6)
    a = model.get_submodule("base_model.bert.encoder.layer.0.attention.self.key").lora_A["fresh"].weight
    assert a.abs().max() <= 1 / a.shape[1] ** 0.5 and a.abs().max() > 0


def test_adapter_layers_stay_in_model_order_as_adapters_come_and_go():
    from deltatune.core.layer import AdapterLayer

    def walked(model):
        return [p for p, m in model.base_model.named_modules() if isinstance(m, AdapterLayer)]

    model = dt.attach(BERT.base(), dt.LoraConfig(r=2, targets=["v"]))
    model.add(dt.LoraConfig(r=2, targets=["q", "k"]), name="b")
    listed = [p for p, _ in model.adapter_layers()]
    assert listed == walked(model) and len(listed) == 3 * BERT.n_blocks + 1  # q, k, v per block + the head
    model.remove("default")
    assert [p for p, _ in model.adapter_layers()] == walked(model)
    assert not any(p.endswith("value") for p, _ in model.adapter_layers())


def test_a_module_to_save_that_holds_another_adapters_layer_is_refused():
    # a trainable copy of bert.pooler would copy adapter a's wrapper in it, and the original
    # wrapper would move to bert.pooler.base_layer.dense, off the path the model lists it under
    from deltatune.core.layer import AdapterLayer

    model = dt.attach(BERT.base(), dt.LoraConfig(r=2, targets=["pooler.dense"], modules_to_save=[]), name="a")
    before = dict(model.adapter_layers())
    with pytest.raises(dt.TargetError, match=r"bert\.pooler contains bert\.pooler\.dense, which carries a LoraLinear "
                                             r"adapter; modules_to_save cannot wrap .* disjoint modules"):
        model.add(dt.LoraConfig(r=2, targets=["q"], modules_to_save=["pooler"]), name="b")
    assert model.adapter_names == ["a"] and dict(model.adapter_layers()) == before
    assert {p: m for p, m in model.base_model.named_modules() if isinstance(m, AdapterLayer)} == before
