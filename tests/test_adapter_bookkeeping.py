"""Bookkeeping that adapter loading speeds up must stay exact: which parameters train after any
sequence of add/load/use/set_trainable/remove, and the targets a loaded adapter resolves to."""

from __future__ import annotations

import torch

import deltatune as dt
from deltatune.core.targets import visible_modules, walk_once

from tests.toy_models import build_bert, token_ids


def _expected_trainable(model: dt.AdaptedModel, name: str) -> bool:
    # the rule from AdaptedModel.use: only active adapters marked trainable get gradients
    return name in model.active_adapters and name in model._trainable


def _check_flags(model: dt.AdaptedModel) -> None:
    for path, layer in model.adapter_layers():
        for name in layer.adapter_names:
            params = layer.adapter_parameters(name)
            assert params, f"{path} lists no parameters for {name}"
            want = _expected_trainable(model, name)
            assert all(p.requires_grad == want for p in params), (path, name, want)
    # nothing else trains: the frozen base and the adapters' inactive copies
    adapter_ids = {id(p) for _, layer in model.adapter_layers() for n in layer.adapter_names
                   for p in layer.adapter_parameters(n)}
    assert not any(p.requires_grad for p in model.parameters() if id(p) not in adapter_ids)


def test_requires_grad_follows_every_switch(tmp_path):
    torch.manual_seed(0)
    model = dt.attach(build_bert(), dt.LoraConfig(r=4, targets=["query", "value"]))
    model.save(str(tmp_path / "a"))
    _check_flags(model)
    for i in range(3):
        model.load(str(tmp_path / "a"), name=f"f{i}")  # frozen, inactive
        _check_flags(model)
    model.load(str(tmp_path / "a"), name="t", trainable=True)
    _check_flags(model)
    for names in (["t"], ["f1"], ["t", "f0"], ["default"], ["t"]):
        model.use(names)
        _check_flags(model)
    model.set_trainable("f2")
    model.use(["f2"])
    _check_flags(model)
    model.set_trainable("f2", False)
    _check_flags(model)
    model.remove("f2")
    model.use(["default"])
    _check_flags(model)
    # a re-added name starts over: its new parameters must be set, not assumed frozen
    model.load(str(tmp_path / "a"), name="f2")
    _check_flags(model)
    model.set_trainable("f2")
    model.use(["f2"])
    _check_flags(model)
    assert any(p.requires_grad for p in model.base_model.parameters())


def test_loaded_adapter_equals_original_among_many(tmp_path):
    torch.manual_seed(0)
    model = dt.attach(build_bert().eval(), dt.LoraConfig(r=4, targets=["q", "v"]))
    with torch.no_grad():
        for _, layer in model.adapter_layers():
            for p in layer.adapter_parameters("default"):
                p.add_(torch.randn_like(p) * 0.3)
    batch = {"input_ids": token_ids()}
    expected = model(**batch).logits
    model.save(str(tmp_path / "a"))
    for i in range(4):
        model.load(str(tmp_path / "a"), name=f"copy{i}")
    model.use("copy3")
    torch.testing.assert_close(model(**batch).logits, expected)
    assert model.configs["copy3"].targets == model.configs["default"].targets


def test_walk_once_reuses_one_walk_and_ends_with_the_block():
    model = build_bert(layers=2)
    plain = visible_modules(model)
    with walk_once():
        first = visible_modules(model)
        model.bert.encoder.layer[0].attention.self.query = torch.nn.Identity()
        assert visible_modules(model) == first  # the promised reuse: the block's caller wraps only
    assert first == plain
    assert isinstance(visible_modules(model)["bert.encoder.layer.0.attention.self.query"], torch.nn.Identity)


def test_walk_once_walks_again_when_a_wrapper_hides_sub_modules():
    from deltatune.core.layer import ModulesToSave
    from deltatune.core.wrapping import wrapped

    model = build_bert(layers=2)
    with walk_once():
        assert "bert.pooler.dense" in visible_modules(model)
        wrapped(model, "bert.pooler", ModulesToSave, "test")  # a container: its dense is hidden now
        after = visible_modules(model)
    assert "bert.pooler" in after and "bert.pooler.dense" not in after
    assert after == visible_modules(model)
