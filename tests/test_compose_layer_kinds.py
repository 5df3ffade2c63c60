"""Hot swap and combination on every LoRA layer kind (Linear, Conv1D, Embedding, Conv2d, fused
expert weights), through the layers' factor interface. References: a fresh load of the same
file; peft's ``add_weighted_adapter`` on the same two adapters; the adapters' own outputs; the
task-vector formula for trained head copies."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from tests.arch_zoo import ZOO
from tests.toy_models import TOYS, assert_differs, assert_same, layer_zoo, logits, peft_lora, zoo_input

pytestmark = pytest.mark.usefixtures("one_thread")

ZOO_LAYERS = ["lin", "conv1d", "emb", "conv3", "conv1"]


def _randomized(model: dt.AdaptedModel, seed: int) -> dt.AdaptedModel:
    """Every trainable tensor drawn at random (B included), so each factor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _zoo_outputs(model) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {layer: model(zoo_input(layer), layer=layer).clone() for layer in ZOO_LAYERS}


def _saved(tmp_path, folder: str, build, config: dt.LoraConfig, seed: int):
    model = _randomized(dt.attach(build(), config), seed)
    model.save(tmp_path / folder)
    return tmp_path / folder


@pytest.mark.parametrize(("new_r", "new_alpha"), [(3, 9.0), (2, 1.0)], ids=["same-rank", "smaller-rank"])
def test_hot_swap_on_every_layer_kind_equals_a_fresh_load(tmp_path, new_r, new_alpha):
    first = _saved(tmp_path, "first", layer_zoo, dt.LoraConfig(r=3, alpha=6, targets=ZOO_LAYERS), 1)
    second = _saved(tmp_path, "second", layer_zoo, dt.LoraConfig(r=new_r, alpha=new_alpha, targets=ZOO_LAYERS), 2)
    serving = dt.load(layer_zoo(), first, name="live")
    params_before = {n: id(p) for n, p in serving.named_parameters()}
    serving.hot_swap("live", second)
    fresh = _zoo_outputs(dt.load(layer_zoo(), second))
    swapped = _zoo_outputs(serving)
    for layer in ZOO_LAYERS:
        assert_differs(fresh[layer], _zoo_outputs(layer_zoo())[layer])
        assert_same(swapped[layer], fresh[layer], atol=1e-5)
    assert {n: id(p) for n, p in serving.named_parameters()} == params_before


def test_hot_swap_with_an_embedding_target_and_a_new_alpha_equals_a_fresh_load(tmp_path):
    toy = TOYS["bert"]
    targets = ["word_embeddings", "query", "value"]
    first = _saved(tmp_path, "first", toy.base, dt.LoraConfig(r=4, alpha=8, targets=targets), 1)
    second = _saved(tmp_path, "second", toy.base, dt.LoraConfig(r=4, alpha=2, targets=targets), 2)
    serving = dt.load(toy.base(), first, name="live").eval()
    serving.hot_swap("live", second)
    assert_same(logits(serving, toy.batch()), logits(dt.load(toy.base(), second).eval(), toy.batch()), atol=1e-5)


def test_hot_swap_on_fused_expert_weights_folds_the_new_scale_and_refuses_another_rank(tmp_path):
    entry = ZOO["mixtral"]
    config = dict(targets=["q"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    first = _saved(tmp_path, "first", entry.build, dt.LoraConfig(r=2, alpha=4, **config), 1)
    second = _saved(tmp_path, "second", entry.build, dt.LoraConfig(r=2, alpha=1, **config), 2)
    other_rank = _saved(tmp_path, "r1", entry.build, dt.LoraConfig(r=1, alpha=4, **config), 3)
    batch = {k: v for k, v in entry.batch().items() if k != "labels"}
    serving = dt.load(entry.build(), first, name="live").eval()
    serving.hot_swap("live", second)
    assert_same(logits(serving, batch), logits(dt.load(entry.build(), second).eval(), batch), atol=1e-5)
    before = logits(serving, batch)
    with pytest.raises(dt.AdapterFileError, match="same rank only"):
        serving.hot_swap("live", other_rank)
    assert_same(logits(serving, batch), before, atol=0)


def _two_peft_adapters(tmp_path):
    """peft's model with random adapters "default" (r=3) and "b" (r=2) on every zoo layer, and deltatune's copy."""
    import peft
    reference = peft_lora(None, layer_zoo(), r=3, lora_alpha=6, target_modules=ZOO_LAYERS, init_lora_weights=False)
    torch.manual_seed(1)
    reference.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=5, target_modules=ZOO_LAYERS, init_lora_weights=False))
    reference.save_pretrained(tmp_path)
    ours = dt.load(layer_zoo(), tmp_path)
    ours.load(tmp_path / "b", "b")
    return reference, ours


@pytest.mark.parametrize(("how", "rank"), [("cat", None), ("svd", 3), ("svd", 2)], ids=["cat", "svd-3", "svd-2"])
def test_cat_and_svd_combinations_equal_peft_on_every_layer_kind(tmp_path, how, rank):
    reference, ours = _two_peft_adapters(tmp_path)
    weights = {"default": 0.7, "b": -0.4}
    reference.add_weighted_adapter(list(weights), list(weights.values()), "mix", combination_type=how,
                                   **({"svd_rank": rank} if rank else {}))
    ours.combine(weights, "mix", how=how, rank=rank)
    for layer in ZOO_LAYERS:
        expected = reference.base_model.model.get_submodule(layer).get_delta_weight("mix")
        assert expected.abs().max() > 1e-3
        assert_same(ours.base_model.get_submodule(layer).delta_weight("mix"), expected, atol=1e-5)


@pytest.mark.parametrize("how", ["cat", "linear", "svd"])
def test_combining_one_adapter_with_weight_one_gives_that_adapter_head_included(how):
    toy = TOYS["bert"]
    model = _randomized(dt.attach(toy.base(), dt.LoraConfig(r=2, targets=["word_embeddings", "query"])), 3).eval()
    expected = logits(model, toy.batch())
    model.combine({"default": 1.0}, "same", how=how, rank=2)
    model.use("same")
    assert_same(logits(model, toy.batch()), expected, atol=1e-5)


def test_trained_heads_combine_as_task_vectors():
    toy = TOYS["bert"]
    model = _randomized(dt.attach(toy.base(), dt.LoraConfig(r=2, targets=["query"])), 4)
    model.add(dt.LoraConfig(r=2, targets=["query", "value"]), "b")
    _randomized(model.use("b"), 5)
    model.combine({"default": 0.7, "b": 0.5}, "mix", how="cat")
    head = model.base_model.classifier
    base = toy.base().classifier
    for key in ("weight", "bias"):
        mine = {n: getattr(head.modules_to_save[n], key) for n in ("default", "b", "mix")}
        original = getattr(base, key)
        by_hand = original + 0.7 * (mine["default"] - original) + 0.5 * (mine["b"] - original)
        assert_same(mine["mix"], by_hand, atol=1e-6)
        assert_differs(mine["mix"], original)


def test_combine_refuses_adapters_that_train_biases():
    model = dt.attach(TOYS["llama"].base(), dt.LoraConfig(r=2, targets=["q"], bias="all"))
    with pytest.raises(dt.AdapterError, match="bias='all'"):
        model.combine({"default": 1.0}, "x", how="cat")
    assert model.adapter_names == ["default"]


@pytest.mark.parametrize("layer", ["lin", "conv1d", "emb", "conv3"])
def test_each_layer_kind_adds_each_adapter_s_update_to_its_own_rows(layer):
    from deltatune.core.routing import RowRouting
    model = _randomized(dt.attach(layer_zoo(), dt.LoraConfig(r=3, targets=ZOO_LAYERS), name="a"), 6)
    model.add(dt.LoraConfig(r=2, alpha=5, targets=ZOO_LAYERS), "b")
    _randomized(model.use("b"), 7)
    wrapper = model.base_model.get_submodule(layer)
    names = ["b", "a", "b", "__base__"]  # b's rows are not contiguous: gathered and scattered back
    x = torch.cat([zoo_input(layer)] * 2)
    wrapper.routing = RowRouting(names, gather=False)
    with torch.no_grad():
        mixed = wrapper(x)
        wrapper.routing = None
        alone = []
        for i, name in enumerate(names):
            wrapper.set_active([] if name == "__base__" else [name])
            alone.append(wrapper(x[i:i + 1]))
    assert_same(mixed, torch.cat(alone), atol=1e-6)
    assert_differs(alone[0], alone[1])
