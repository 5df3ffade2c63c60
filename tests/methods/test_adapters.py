"""Bottleneck adapters (Houlsby, Pfeiffer, parallel): the shared contract on the four toys,
placement per architecture, outputs against the formula written out by hand, and training."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.methods.adapters import AdapterConfig, BottleneckLayer
from tests.methods import contract
from tests.methods.short_training import train_briefly

TOYS = contract.TOYS
WIDTH = 4  # bottleneck of every toy adapter; the toys' hidden size is 32
HIDDEN = 32
BERT_HEAD = HIDDEN * 3 + 3  # the classifier, trained with every method on sequence classification

# wrapped module paths (relative to the block) per style and toy, written out by hand
PLACEMENT = {
    "houlsby": {"bert": {"attention.output.dense", "output.dense"}, "gpt2": {"attn.c_proj", "mlp.c_proj"},
                "llama": {"self_attn.o_proj", "mlp.down_proj"},
                "t5": {"layer.0.SelfAttention.o", "layer.1.EncDecAttention.o", "layer.1.DenseReluDense.wo",
                       "layer.2.DenseReluDense.wo"}},
    "pfeiffer": {"bert": {"output.dense"}, "gpt2": {"mlp.c_proj"}, "llama": {"mlp.down_proj"},
                 "t5": {"layer.1.DenseReluDense.wo", "layer.2.DenseReluDense.wo"}},
    "parallel": {"bert": {"output"}, "gpt2": {"mlp"}, "llama": {"mlp"},
                 "t5": {"layer.1.DenseReluDense", "layer.2.DenseReluDense"}},
}
# number of wrapped modules: 4 blocks per toy; T5 has 2 encoder blocks (self-attention, FFN) and
# 2 decoder blocks (self-attention, cross-attention, FFN)
SITES = {"houlsby": {"bert": 8, "gpt2": 8, "llama": 8, "t5": 2 * 2 + 2 * 3},
         "pfeiffer": {"bert": 4, "gpt2": 4, "llama": 4, "t5": 4},
         "parallel": {"bert": 4, "gpt2": 4, "llama": 4, "t5": 4}}
STYLES = list(SITES)


def config(style: str, **kw) -> AdapterConfig:
    return AdapterConfig(style=style, bottleneck=WIDTH, **kw)


def expected_trainable(style: str, toy: str) -> int:
    per_site = (HIDDEN * WIDTH + WIDTH) + (WIDTH * HIDDEN + HIDDEN)  # down and up, with biases
    return SITES[style][toy] * per_site + (BERT_HEAD if toy == "bert" else 0)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("toy", TOYS.values(), ids=TOYS.keys())
def test_adapter_contract(toy, style, tmp_path):
    cfg = config(style)
    contract.check_only_adapter_parameters_train(toy, cfg)
    contract.check_changes_and_disables(toy, cfg)
    tensors = contract.check_save_load(toy, cfg, tmp_path)
    assert all(".adapter." in k for k in tensors if ".classifier." not in k)
    contract.check_remove_restores_base(toy, cfg)
    contract.check_mixed_batch(toy, cfg)
    contract.check_trainable_count(toy, cfg, expected_trainable(style, toy.name))


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("toy", TOYS.values(), ids=TOYS.keys())
def test_placement_per_architecture(toy, style):
    model = dt.attach(toy.base(), config(style))
    spec = dt.core.archspec.spec_for(model.base_model)
    wrapped = [p for p, layer in model.adapter_layers() if isinstance(layer, BottleneckLayer)]
    assert len(wrapped) == SITES[style][toy.name]
    assert {spec.split(p)[2] for p in wrapped} == PLACEMENT[style][toy.name]


def test_merge_is_refused_with_a_clear_error():
    toy = TOYS["gpt2"]
    model = contract.perturbed(dt.attach(toy.base(), config("houlsby")))
    before = contract.logits(model, toy.loss_batch())
    for merge in (model.merge, model.merge_and_unload):
        with pytest.raises(dt.AdapterError, match="cannot be merged"):
            merge()
    assert not model.merged
    torch.testing.assert_close(contract.logits(model, toy.loss_batch()), before, atol=0, rtol=0)


# --- outputs against the formula -----------------------------------------------------------

def _capture(module: torch.nn.Module) -> dict:
    """Records the inputs and output of every call of ``module``."""
    seen: dict = {}

    def hook(_, args, kwargs, output):
        seen.update(args=args, kwargs=kwargs, output=output)
    module.register_forward_hook(hook, with_kwargs=True)
    return seen


def _bottleneck(layer: BottleneckLayer, x: torch.Tensor, act) -> torch.Tensor:
    block = layer.adapter["default"]
    hidden = act(x @ block.down.weight.T + block.down.bias)
    return hidden @ block.up.weight.T + block.up.bias


@pytest.mark.parametrize("style", ["houlsby", "pfeiffer"])
def test_sequential_adapter_adds_bottleneck_of_the_output(style):
    toy = TOYS["llama"]
    model = contract.perturbed(dt.attach(toy.base(), config(style, activation="gelu", scaling=2.0)))
    layer = model.base_model.get_submodule("model.layers.1.mlp.down_proj")
    inner, outer = _capture(layer.base_layer), _capture(layer)
    contract.logits(model, toy.loss_batch())
    y = inner["output"]  # the projection's own output: y = W x
    expected = y + 2.0 * _bottleneck(layer, y, F.gelu)
    torch.testing.assert_close(outer["output"], expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(expected, y, atol=1e-3)


def test_parallel_adapter_reads_the_ffn_input():
    toy = TOYS["gpt2"]
    model = contract.perturbed(dt.attach(toy.base(), config("parallel", scaling=4.0)))
    layer = model.base_model.get_submodule("transformer.h.2.mlp")
    outer = _capture(layer)
    contract.logits(model, toy.loss_batch())
    x = outer["args"][0]  # the FFN block's input (ln_2 of the residual stream)
    with torch.no_grad():
        ffn = layer.base_layer(x)
    expected = ffn + 4.0 * _bottleneck(layer, x, F.relu)
    torch.testing.assert_close(outer["output"], expected, atol=1e-6, rtol=1e-6)


def _bottleneck_in_float64(layer: BottleneckLayer, x: torch.Tensor, act) -> torch.Tensor:
    """``up(act(down(x)))`` of adapter "default", computed in float64 from the block's weights."""
    w = {n: p.detach().double() for n, p in layer.adapter["default"].named_parameters()}
    hidden = act(x.double() @ w["down.weight"].T + w["down.bias"])
    return hidden @ w["up.weight"].T + w["up.bias"]


@pytest.mark.parametrize("prepare, convert, adapter_dtype, tol", [
    (lambda m: m, lambda m: m.double(), torch.float64, 1e-10),
    (lambda m: m, lambda m: m.half(), torch.float16, 1e-2),
    (lambda m: m.to(torch.bfloat16), lambda m: m, torch.float32, 2e-2),
], ids=["double-after-adding", "half-after-adding", "fp32-adapter-on-bfloat16-base"])
def test_the_adapter_computes_in_its_own_dtype_also_after_the_model_is_converted(prepare, convert, adapter_dtype,
                                                                                  tol):
    toy = TOYS["llama"]
    model = contract.perturbed(dt.attach(prepare(toy.base()), config("pfeiffer", activation="gelu", scaling=2.0)))
    convert(model)
    layer = model.base_model.get_submodule("model.layers.1.mlp.down_proj")
    assert {p.dtype for p in layer.adapter_parameters("default")} == {adapter_dtype}
    inner, outer = _capture(layer.base_layer), _capture(layer)
    contract.logits(model, toy.loss_batch())
    y = inner["output"]
    assert outer["output"].dtype == y.dtype == layer.base_layer.weight.dtype
    expected = y.double() + 2.0 * _bottleneck_in_float64(layer, y, F.gelu)
    torch.testing.assert_close(outer["output"].double(), expected, atol=tol, rtol=tol)


def test_parallel_adapter_on_bert_adds_to_the_ffn_output_before_the_layernorm():
    toy = TOYS["bert"]
    model = contract.perturbed(dt.attach(toy.base(), config("parallel")))
    layer = model.base_model.get_submodule("bert.encoder.layer.1.output")
    outer = _capture(layer)
    contract.logits(model, toy.loss_batch())
    h, x = outer["args"]  # intermediate activations and the FFN block's input
    base = layer.base_layer
    ffn = h @ base.dense.weight.T + base.dense.bias  # eval mode: dropout is the identity
    expected = F.layer_norm(ffn + x + _bottleneck(layer, x, F.relu), (HIDDEN,), base.LayerNorm.weight,
                            base.LayerNorm.bias, base.LayerNorm.eps)
    torch.testing.assert_close(outer["output"], expected, atol=1e-5, rtol=1e-5)


def test_identity_init_starts_as_the_base_model():
    toy = TOYS["bert"]
    expected = contract.logits(toy.base(), toy.loss_batch())
    model = dt.attach(toy.base(), config("houlsby", init="identity"))
    torch.testing.assert_close(contract.logits(model, toy.loss_batch()), expected, atol=0, rtol=0)


def test_near_identity_init_is_small_truncated_noise():
    model = dt.attach(TOYS["llama"].base(), AdapterConfig(style="pfeiffer", bottleneck=16, init="near-identity"))
    block = model.base_model.get_submodule("model.layers.0.mlp.down_proj").adapter["default"]
    for proj in (block.down, block.up):
        assert proj.weight.abs().max() <= 2e-2
        assert 0.003 < proj.weight.std() < 0.012
        assert torch.count_nonzero(proj.bias) == 0


def test_bottleneck_width_from_reduction_factor():
    model = dt.attach(TOYS["gpt2"].base(), AdapterConfig(style="pfeiffer", reduction_factor=8))
    block = model.base_model.get_submodule("transformer.h.0.mlp.c_proj").adapter["default"]
    assert (block.down.in_features, block.down.out_features, block.up.out_features) == (32, 32 // 8, 32)


def test_saved_config_names_the_method_and_reloads_the_same_placement(tmp_path):
    toy = TOYS["bert"]
    cfg = AdapterConfig(style="houlsby", bottleneck=WIDTH, layers=[1, 3], activation="tanh")
    model = contract.perturbed(dt.attach(toy.base(), cfg))
    model.save(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["deltatune_method"] == "adapters" and "peft_type" not in data
    assert (data["style"], data["activation"], data["bottleneck"]) == ("houlsby", "tanh", WIDTH)
    loaded = dt.load(toy.base(), tmp_path)
    assert [p for p, _ in loaded.adapter_layers()] == [p for p, _ in model.adapter_layers()]
    assert len(list(loaded.adapter_layers())) == 2 * 2 + 1  # two blocks, two sites each, and the head


@pytest.mark.parametrize("bad, match", [
    ({"style": "serial"}, "style"), ({"reduction_factor": 0}, "reduction_factor"), ({"bottleneck": 0}, "bottleneck"),
    ({"activation": "softmax"}, "activation"), ({"scaling": 0}, "scaling"), ({"init": "zeros"}, "init"),
])
def test_config_validation(bad, match):
    with pytest.raises(dt.ConfigError, match=match):
        AdapterConfig(**bad)


# --- together with other adapters ----------------------------------------------------------

def test_lora_and_adapters_on_disjoint_modules_work_together(tmp_path):
    toy = TOYS["bert"]
    inputs = toy.loss_batch()
    model = dt.attach(toy.base(), dt.LoraConfig(r=2, targets=["q", "v"], init="random"), "lora")
    # one classification head between them: a ModulesToSave runs only one adapter's copy
    model.add(config("pfeiffer", init="near-identity", modules_to_save=[]), "bottleneck")
    model.use(["lora", "bottleneck"])
    contract.perturbed(model)  # near-identity init barely changes outputs; move both adapters away
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_A.lora." in n for n in trainable) and any(".adapter.bottleneck." in n for n in trainable)
    model.train()
    model(**inputs).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    both = contract.logits(model, inputs)
    singles = {n: contract.logits(model.use(n), inputs) for n in ("lora", "bottleneck")}
    with model.disabled():
        base = contract.logits(model, inputs)
    for n, out in singles.items():
        assert not torch.allclose(out, base, atol=1e-5) and not torch.allclose(out, both, atol=1e-5), n
    # saved separately, loaded together onto a fresh base: the same combined output
    for n in ("lora", "bottleneck"):
        model.save(tmp_path / n, adapter=n)
    fresh = dt.load(toy.base(), tmp_path / "lora", "lora")
    fresh.load(tmp_path / "bottleneck", "bottleneck")
    fresh.use(["lora", "bottleneck"])
    torch.testing.assert_close(contract.logits(fresh.eval(), inputs), both, atol=1e-6, rtol=0)


def test_parallel_adapter_refuses_to_nest_around_an_adapted_layer():
    model = dt.attach(TOYS["gpt2"].base(), dt.LoraConfig(r=2, targets=["up"]), "lora")
    with pytest.raises(dt.TargetError, match="disjoint"):
        model.add(config("parallel"), "parallel")
    assert [p for p, _ in model.adapter_layers()] == [f"transformer.h.{i}.mlp.c_fc" for i in range(4)]


@pytest.mark.parametrize("first, second, wrapper", [
    (lambda: config("pfeiffer"), lambda: dt.CompacterConfig(bottleneck=WIDTH, phm_dim=2), "BottleneckLayer"),
    (lambda: dt.CompacterConfig(bottleneck=WIDTH, phm_dim=2), lambda: config("pfeiffer"), "CompacterLayer"),
], ids=["compacter-over-adapters", "adapters-over-compacter"])
def test_adapters_and_compacter_refuse_to_share_a_module(first, second, wrapper):
    # a CompacterLayer is a BottleneckLayer, but runs its blocks with the shared PHM rule: no mixing
    model = dt.attach(TOYS["gpt2"].base(), first(), "first")
    layers = dict(model.adapter_layers())
    with pytest.raises(dt.TargetError, match=rf"transformer\.h\.0\.mlp\.c_proj already carries a {wrapper} adapter;"
                                             r".*disjoint modules"):
        model.add(second(), "second")
    assert model.adapter_names == ["first"] and dict(model.adapter_layers()) == layers
    assert all(layer.adapter_names == ["first"] for layer in layers.values())


# --- real training -------------------------------------------------------------------------

def test_adapters_learn_sst2_on_minilm():
    run = train_briefly(AdapterConfig(style="pfeiffer", reduction_factor=16), steps=60, lr=3e-3)
    assert run.accuracy_after > run.accuracy_before + 0.10, run
