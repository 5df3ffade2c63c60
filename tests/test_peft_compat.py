"""Adapter folders move both ways between deltatune and HF peft with identical outputs.

Each case states one adapter in deltatune's words and in peft's. deltatune's folder must load in
``peft.PeftModel.from_pretrained`` and give deltatune's logits; peft's ``save_pretrained`` folder
must load with ``dt.load`` and give peft's logits; both write the same tensor names and shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from tests.toy_models import (TOYS, Toy, assert_differs, assert_same, is_lora_param, layer_zoo, logits, lora_paths,
                              module_types, peft_lora, randomize, zoo_input)

pytestmark = pytest.mark.usefixtures("one_thread")

R, ALPHA = 4, 8
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


@dataclass(frozen=True)
class Compat:
    toy: Toy
    dt_kwargs: dict
    peft_kwargs: dict


_LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "bert-seqcls-head": Compat(TOYS["bert"], {"targets": ["q", "v"]}, {"target_modules": ["query", "value"]}),
    "gpt2-conv1d": Compat(TOYS["gpt2"], {"targets": ["q", "o", "down"]},
                          {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}),
    "llama-all-proj": Compat(TOYS["llama"], {"targets": ["q", "k", "v", "o", "gate", "up", "down"]},
                             {"target_modules": _LLAMA_ALL}),
    "t5-attention": Compat(TOYS["t5"], {"targets": ["q", "k", "v", "o"]}, {"target_modules": ["q", "k", "v", "o"]}),
    "bert-rank-alpha-pattern": Compat(
        TOYS["bert"],
        {"targets": ["q", "v"], "rank_pattern": {"value": 2, r"layer\.1\.attention\.self\.query": 6},
         "alpha_pattern": {"value": 3}},
        {"target_modules": ["query", "value"], "rank_pattern": {"value": 2, r"layer\.1\.attention\.self\.query": 6},
         "alpha_pattern": {"value": 3}}),
    "llama-rslora": Compat(TOYS["llama"], {"targets": ["q", "v"], "use_rslora": True},
                           {"target_modules": ["q_proj", "v_proj"], "use_rslora": True}),
    "llama-layers": Compat(TOYS["llama"], {"targets": ["q", "v"], "layers": [1, 3]},
                           {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1, 3]}),
    "t5-layers-per-stack": Compat(TOYS["t5"], {"targets": ["q", "v"], "layers": [1]},
                                  {"target_modules": ["q", "v"], "layers_to_transform": [1], "layers_pattern": "block"}),
    "gpt2-bias-all": Compat(TOYS["gpt2"], {"targets": ["q"], "bias": "all"},
                            {"target_modules": ["c_attn"], "fan_in_fan_out": True, "bias": "all"}),
    "gpt2-bias-lora-only": Compat(TOYS["gpt2"], {"targets": ["q", "up"], "bias": "lora_only"},
                                  {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True, "bias": "lora_only"}),
    "bert-bias-lora-only": Compat(TOYS["bert"], {"targets": ["q", "v"], "bias": "lora_only"},
                                  {"target_modules": ["query", "value"], "bias": "lora_only"}),
    "bert-bias-all-with-head": Compat(TOYS["bert"], {"targets": ["q", "v"], "bias": "all"},
                                      {"target_modules": ["query", "value"], "bias": "all"}),
    "bert-embeddings": Compat(TOYS["bert"], {"targets": ["word_embeddings", "q"]},
                              {"target_modules": ["word_embeddings", "query"]}),
    "llama-embeddings": Compat(TOYS["llama"], {"targets": ["embed_tokens", "o"]},
                               {"target_modules": ["embed_tokens", "o_proj"]}),
    # BERT's "down" is the layer's output.dense but not attention.output.dense: peft needs a regex
    "bert-down-as-regex": Compat(TOYS["bert"], {"targets": ["down"]},
                                 {"target_modules": r".*\.layer\.\d+\.output\.dense"}),
    "bert-all-linear-exclude": Compat(TOYS["bert"], {"targets": "all-linear", "exclude": ["key"]},
                                      {"target_modules": "all-linear", "exclude_modules": ["key"]}),
    "llama-one-layer-as-int": Compat(TOYS["llama"], {"targets": ["q", "v"], "layers": 2},
                                     {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": 2}),
    "llama-lm-head-saved": Compat(TOYS["llama"], {"targets": ["q"], "modules_to_save": ["lm_head"]},
                                  {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
}


@pytest.fixture(params=list(CASES.values()), ids=list(CASES))
def case(request) -> Compat:
    return request.param


def _not_lora(name: str) -> bool:
    return not is_lora_param(name)


def ours(case: Compat) -> dt.AdaptedModel:
    """deltatune's adapter with every trained tensor random: LoRA factors, head copy, biases."""
    model = dt.attach(case.toy.base(), dt.LoraConfig(r=R, alpha=ALPHA, init="random", **case.dt_kwargs))
    return randomize(model, only=_not_lora).eval()


def theirs(case: Compat):
    """peft's adapter for the same case, every trained tensor random too."""
    model = peft_lora(case.toy, case.toy.base(), r=R, lora_alpha=ALPHA, init_lora_weights=False, **case.peft_kwargs)
    return randomize(model, only=_not_lora, seed=8).eval()


def _shapes(folder) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in load_file(str(folder / WEIGHTS)).items()}


# deltatune's fused LoRA node folds the update into the fp32 weight (x (W + s B A)^T) where peft
# adds s (x A^T) B^T after the frozen matmul; the two roundings part by up to ~2e-6 on the T5 toy's
# logits (whose size is ~1), so "identical" is 1e-5 here
LOGIT_ATOL = 1e-5


def test_deltatune_folder_loads_in_peft_with_identical_outputs(case, tmp_path):
    import peft
    batch = case.toy.batch()
    model = ours(case)
    expected = logits(model, batch)
    assert_differs(expected, logits(case.toy.base(), batch))
    model.save(tmp_path / "ours")

    loaded = peft.PeftModel.from_pretrained(case.toy.base(), tmp_path / "ours").eval()
    assert_same(logits(loaded, batch), expected, atol=LOGIT_ATOL)
    # the LoRA tensors are exactly those peft writes for this adapter, and every other tensor we
    # write (head copy, biases) peft writes too (peft may add more: full embedding matrices)
    theirs(case).save_pretrained(tmp_path / "theirs")
    mine, peft_own = _shapes(tmp_path / "ours"), _shapes(tmp_path / "theirs")
    assert {k: v for k, v in mine.items() if is_lora_param(k)} == {k: v for k, v in peft_own.items() if is_lora_param(k)}
    assert {k: v for k, v in mine.items() if not is_lora_param(k)}.items() <= peft_own.items()


def test_peft_folder_loads_in_deltatune_with_identical_outputs(case, tmp_path):
    batch = case.toy.batch()
    reference = theirs(case)
    expected = logits(reference, batch)
    assert_differs(expected, logits(case.toy.base(), batch))
    reference.save_pretrained(tmp_path)

    loaded = dt.load(case.toy.base(), tmp_path).eval()
    assert_same(logits(loaded, batch), expected, atol=LOGIT_ATOL)
    assert lora_paths(loaded) == lora_paths(reference.base_model.model)


def test_the_same_parameters_train_as_in_peft_and_all_get_gradients(case):
    model = dt.attach(case.toy.base(), dt.LoraConfig(r=R, alpha=ALPHA, init="random", **case.dt_kwargs)).train()
    reference = theirs(case)
    trainable = {n.removeprefix("base_model."): p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {n.removeprefix("base_model.model.") for n, p in reference.named_parameters()
                              if p.requires_grad}
    assert model.parameter_counts() == reference.get_nb_trainable_parameters()

    model(**case.toy.loss_batch()).loss.backward()
    assert sorted(n for n, p in trainable.items() if p.grad is None) == []
    assert sorted(n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None) == []


@pytest.mark.parametrize("layer", ["conv1d", "emb", "conv3", "conv1"])
@pytest.mark.parametrize("direction", ["deltatune-to-peft", "peft-to-deltatune"])
def test_conv_and_embedding_folders_move_both_ways(layer, direction, tmp_path):
    """A plain torch module (no transformers config, no task type) with Conv1D/Embedding/Conv2d."""
    import peft
    x = zoo_input(layer)
    kwargs = {"r": 3, "fan_in_fan_out": layer == "conv1d"}
    if direction == "deltatune-to-peft":
        writer = dt.attach(layer_zoo(), dt.LoraConfig(r=3, alpha=5, init="random", targets=[layer])).eval()
        writer.save(tmp_path)
        reader = peft.PeftModel.from_pretrained(layer_zoo(), tmp_path).eval()
    else:
        writer = peft_lora(None, layer_zoo(), lora_alpha=5, target_modules=[layer], init_lora_weights=False, **kwargs)
        writer.save_pretrained(tmp_path)
        reader = dt.load(layer_zoo(), tmp_path).eval()
    with torch.no_grad():
        expected = writer(x, layer=layer)
        assert_differs(expected, layer_zoo()(x, layer=layer))
        assert_same(reader(x, layer=layer), expected)


def test_saved_files_use_peft_key_and_field_names(tmp_path):
    import peft
    model = dt.attach(TOYS["bert"].base(), dt.LoraConfig(r=R, alpha=ALPHA, dropout=0.1, targets=["q", "v"]))
    model.save(tmp_path)

    keys = set(load_file(str(tmp_path / WEIGHTS)))
    assert {f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}.lora_{ab}.weight"
            for i in range(4) for m in ("query", "value") for ab in "AB"} | \
           {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} == keys

    config = json.loads((tmp_path / CONFIG).read_text())
    expected = {"peft_type": "LORA", "task_type": "SEQ_CLS", "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.1,
                "bias": "none", "use_rslora": False, "modules_to_save": ["classifier"]}
    assert {k: config.get(k) for k in expected} == expected
    assert sorted(config["target_modules"]) == ["query", "value"]
    assert not {"alpha", "dropout", "targets", "layers", "init"} & set(config), "deltatune's own field names leaked"

    read = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert (read.r, read.lora_alpha, read.lora_dropout, set(read.target_modules)) == (R, ALPHA, 0.1, {"query", "value"})


def test_peft_adapter_with_an_unimplemented_feature_is_refused_with_config_error(tmp_path):
    toy = TOYS["llama"]
    peft_lora(toy, toy.base(), r=R, lora_alpha=ALPHA, target_modules=["q_proj"], lora_bias=True).save_pretrained(tmp_path)
    base = toy.base()
    with pytest.raises(dt.ConfigError, match="lora_bias"):
        dt.load(base, tmp_path)
    assert module_types(base) == module_types(toy.base())
