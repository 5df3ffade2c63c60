"""The method protocol, followed as docs/architecture.md's "add a method" recipe says: a config
class, a Method subclass with inject and the optional hooks, one register call. The method
defined here (biases of the attention queries, with an L2 penalty) then attaches, trains with
its penalty, saves with its file extras and loads back like any built-in method."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core import registry
from deltatune.core.config import MethodConfig, fraction
from deltatune.core.wrapping import wrapped
from deltatune.core.targets import resolve_targets
from deltatune.errors import ConfigError
from deltatune.methods.bitfit.layer import BitFitLayer


@dataclass(frozen=True)
class QueryBiasConfig(MethodConfig):
    """Train a delta on the attention queries' biases, pulled towards zero by ``l2``;
    ``hidden_size`` is filled in from the model when saving (a file extra)."""

    method = "test-query-bias"

    l2: float = 0.1
    hidden_size: int | None = None

    def validate(self) -> None:
        super().validate()
        fraction("l2", self.l2)


class QueryBiasMethod(registry.Method):
    def inject(self, model: nn.Module, config: QueryBiasConfig, name: str) -> list[str]:
        paths = resolve_targets(model, ["query"], kinds=(nn.Linear,))
        for path in paths:
            wrapped(model, path, BitFitLayer, "query bias").add_adapter(name)
        return paths

    def training_penalty(self, model) -> torch.Tensor:
        terms = [(layer.bias_delta[n] ** 2).sum() * model.configs[n].l2
                 for _, layer in model.adapter_layers() if isinstance(layer, BitFitLayer)
                 for n in layer.active_adapters if n in layer.bias_delta]
        return torch.stack(terms).sum()

    def file_extras(self, model, name: str) -> dict:
        return {"hidden_size": model.base_model.config.hidden_size}


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, num_labels=2)).eval()


@pytest.fixture
def query_bias():
    registry.register("test-query-bias", QueryBiasConfig, QueryBiasMethod())
    yield
    registry.unregister("test-query-bias")


def test_a_new_method_attaches_trains_with_its_penalty_saves_and_loads(query_bias, tmp_path):
    model = dt.attach(_bert(), QueryBiasConfig(l2=0.5, modules_to_save=[]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 and all(n.endswith("attention.self.query.bias_delta.default") for n in trainable)
    assert model.parameter_counts()[0] == 2 * 32  # one hidden-size bias delta per block

    deltas = [p for _, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for i, p in enumerate(deltas):
            p.copy_(torch.linspace(-1, 1, 32) * (i + 1))
    expected = 0.5 * sum(float((p.detach() ** 2).sum()) for p in deltas)  # the hook's formula, by hand
    assert float(model.training_penalty().detach()) == pytest.approx(expected, rel=1e-6)

    batch = {"input_ids": torch.randint(3, 100, (4, 6), generator=torch.Generator().manual_seed(1)),
             "labels": torch.tensor([0, 1, 0, 1])}
    before = [p.detach().clone() for p in deltas]
    optimizer = torch.optim.SGD(deltas, lr=0.1)
    for _ in range(3):
        loss = model(**batch).loss + model.training_penalty()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(a, b) for a, b in zip(before, deltas))
    assert float(model.training_penalty().detach()) < expected  # the penalty pulled the deltas in

    model.save(str(tmp_path / "a"))
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["deltatune_method"] == "test-query-bias" and saved["hidden_size"] == 32 and saved["l2"] == 0.5
    loaded = dt.load(_bert(), str(tmp_path / "a"))
    assert isinstance(loaded.configs["default"], QueryBiasConfig) and loaded.configs["default"].hidden_size == 32
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch["input_ids"]).logits, model(input_ids=batch["input_ids"]).logits)


def test_methods_without_penalty_or_extras_use_the_defaults(query_bias):
    model = dt.attach(_bert(), dt.LoraConfig(r=2, targets=["query"], modules_to_save=[]))
    assert model.training_penalty() is None  # LoRA keeps Method.training_penalty's default
    spec = registry.get("lora")
    assert isinstance(spec.method, registry.Method) and spec.config_cls is dt.LoraConfig
    assert spec.method.build_model_adapter(model.base_model, model.configs["default"], "default") is None


def test_every_registered_method_subclasses_method():
    for name in registry.names():
        spec = registry.get(name)
        assert isinstance(spec.method, registry.Method), name
        assert spec.config_cls.method == name


def test_register_refuses_an_untyped_method_or_a_mismatched_name():
    class Duck:
        def inject(self, model, config, name):
            return []

    with pytest.raises(ConfigError, match="subclass Method"):
        registry.register("test-query-bias", QueryBiasConfig, Duck())
    with pytest.raises(ConfigError, match="registered as 'other'"):
        registry.register("other", QueryBiasConfig, QueryBiasMethod())
    assert "test-query-bias" not in registry.names() and "other" not in registry.names()

    class NoInject(registry.Method):
        pass

    with pytest.raises(TypeError, match="inject"):
        NoInject()
