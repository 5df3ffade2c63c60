"""Every architecture family of the zoo (tests/arch_zoo.py): the component aliases select the
modules each family's layout says they should, and a LoRA adapter over all of them runs, moves
to HF peft and back with equal outputs, merges, and generates where the model generates.

The expected modules are written out per family (paths inside a block), not taken from the
alias rules in the source.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.targets import alias_map
from tests.arch_zoo import ZOO
from tests.toy_models import assert_differs, assert_same, randomize

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ["q", "k", "v", "o", "up", "down", "gate"]
# peft 0.21 reads up_proj/gate_proj/down_proj on DeepSeek-V2 as its fused routed experts (its
# transformers-v5 conversion), so an adapter on the shared experts cannot go to peft there
PEFT_READABLE = {"deepseek_v2": ["q", "k", "v", "o"]}
FUSED_EXPERTS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2")

_LLAMA = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
          "up": "mlp.up_proj", "down": "mlp.down_proj", "gate": "mlp.gate_proj"}
_ATTN = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
_BART = {"q": ("self_attn.q_proj", "encoder_attn.q_proj"), "k": ("self_attn.k_proj", "encoder_attn.k_proj"),
         "v": ("self_attn.v_proj", "encoder_attn.v_proj"), "o": ("self_attn.out_proj", "encoder_attn.out_proj"),
         "up": "fc1", "down": "fc2"}
_BERT = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
         "o": "attention.output.dense", "up": "intermediate.dense", "down": "layer.N.output.dense"}
_CLIP = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
         "up": "mlp.fc1", "down": "mlp.fc2"}
_NEOX = {"q": "query_key_value", "k": "query_key_value", "v": "query_key_value", "o": "attention.dense",
         "up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"}
_FALCON = {**_NEOX, "o": "self_attention.dense"}
_GPT2 = {"q": "attn.c_attn", "k": "attn.c_attn", "v": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc",
         "down": "mlp.c_proj"}

#: family -> alias -> the end of each module path it must select (every block); "layer.N." is any block
EXPECTED: dict[str, dict[str, str | tuple[str, ...]]] = {
    **{f: _LLAMA for f in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo")},
    "phi": {**_ATTN, "o": "self_attn.dense", "up": "mlp.fc1", "down": "mlp.fc2"},
    "phi3": {"q": "qkv_proj", "k": "qkv_proj", "v": "qkv_proj", "o": "o_proj", "up": "gate_up_proj",
             "gate": "gate_up_proj", "down": "down_proj"},
    "starcoder2": {**_ATTN, "up": "mlp.c_fc", "down": "mlp.c_proj"},
    "gpt2": _GPT2, "gpt_bigcode": _GPT2,
    "gptj": {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.out_proj", "up": "mlp.fc_in",
             "down": "mlp.fc_out"},
    "gpt_neo": {"q": "attn.attention.q_proj", "k": "attn.attention.k_proj", "v": "attn.attention.v_proj",
                "o": "attn.attention.out_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
    "gpt_neox": _NEOX, "falcon": _FALCON, "bloom": _FALCON,
    "codegen": {"q": "attn.qkv_proj", "k": "attn.qkv_proj", "v": "attn.qkv_proj", "o": "attn.out_proj",
                "up": "mlp.fc_in", "down": "mlp.fc_out"},
    "mpt": {"q": "attn.Wqkv", "k": "attn.Wqkv", "v": "attn.Wqkv", "o": "attn.out_proj", "up": "ffn.up_proj",
            "down": "ffn.down_proj"},
    "opt": {**_ATTN, "o": "self_attn.out_proj", "up": "fc1", "down": "fc2"},
    # MoE: attention, and the shared experts' projections (the routed experts are fused 3-D parameters)
    "mixtral": _ATTN, "qwen3_moe": _ATTN, "olmoe": _ATTN,
    "qwen2_moe": {**_ATTN, "up": "shared_expert.up_proj", "down": "shared_expert.down_proj",
                  "gate": "shared_expert.gate_proj"},
    "deepseek_v2": {"q": "self_attn.q_proj", "k": ("kv_a_proj_with_mqa", "kv_b_proj"),
                    "v": ("kv_a_proj_with_mqa", "kv_b_proj"), "o": "self_attn.o_proj",
                    "up": "shared_experts.up_proj", "down": "shared_experts.down_proj",
                    "gate": "shared_experts.gate_proj"},
    "t5": {a: (f"SelfAttention.{a}", f"EncDecAttention.{a}") for a in "qkvo"} | {"up": "DenseReluDense.wi",
                                                                                  "down": "DenseReluDense.wo"},
    **{f: _BART for f in ("bart", "mbart", "pegasus", "marian", "whisper")},
    **{f: _BERT for f in ("bert", "roberta", "xlm-roberta", "electra")},
    "deberta-v2": {**_BERT, "q": "attention.self.query_proj", "k": "attention.self.key_proj",
                   "v": "attention.self.value_proj"},
    "distilbert": {"q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin", "o": "attention.out_lin",
                   "up": "ffn.lin1", "down": "ffn.lin2"},
    "albert": {"q": "attention.query", "k": "attention.key", "v": "attention.value", "o": "attention.dense",
               "up": "albert_layers.N.ffn", "down": "ffn_output"},
    "mpnet": {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o", "up": "intermediate.dense",
              "down": "layer.N.output.dense"},
    "modernbert": {"q": "attn.Wqkv", "k": "attn.Wqkv", "v": "attn.Wqkv", "o": "attn.Wo", "up": "mlp.Wi",
                   "gate": "mlp.Wi", "down": "mlp.Wo"},
    "vit": {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj", "o": "attention.o_proj",
            "up": "mlp.fc1", "down": "mlp.fc2"},
    "clip_vision_model": _CLIP,
    "wav2vec2": {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
                 "o": "attention.out_proj", "up": "feed_forward.intermediate_dense",
                 "down": "feed_forward.output_dense"},
}


def expected_paths(model, family: str, alias: str) -> set[str]:
    """The module paths that end with the family's spelling of ``alias`` (block numbers as N)."""
    import re
    ends = EXPECTED[family].get(alias, ())
    ends = (ends,) if isinstance(ends, str) else ends
    patterns = [re.compile(r"(?:.*\.)?" + re.escape(e).replace(r"\.N\.", r"\.\d+\.") ) for e in ends]
    return {p for p, m in model.named_modules() if next(m.children(), None) is None
            and any(rx.fullmatch(p) for rx in patterns)}


def test_the_zoo_covers_at_least_35_families_and_every_one_has_expectations():
    assert len(ZOO) >= 35
    assert set(ZOO) == set(EXPECTED)


@pytest.mark.parametrize("family", list(ZOO))
def test_each_alias_selects_the_modules_the_family_layout_names(family):
    model = ZOO[family].build()
    found = {alias: set(paths) for alias, paths in alias_map(model).items()}
    for alias in ALL:
        expected = expected_paths(model, family, alias)
        assert found.get(alias, set()) == expected, (family, alias)
        # every block of every stack contributes: two layers each (ALBERT shares one)
        assert not expected or len(expected) >= (1 if family == "albert" else 2)


def _outputs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).detach().clone()


@pytest.mark.parametrize("family", list(ZOO))
def test_lora_on_every_alias_runs_moves_to_peft_and_back_and_merges(family, tmp_path):
    import peft
    entry = ZOO[family]
    batch = entry.batch()
    base_out = _outputs(entry.build(), batch)
    aliases = PEFT_READABLE.get(family, ALL)
    model = randomize(dt.attach(entry.build(), dt.LoraConfig(r=2, alpha=4, targets=aliases)), scale=0.2)
    wrapped = {p for p, _ in model.adapter_layers()}
    expected = set().union(*(expected_paths(entry.build(), family, a) for a in aliases))
    if family in FUSED_EXPERTS and "up" in aliases:  # the routed experts' 3-D weights, peft's target_parameters
        expected |= {p for p, _ in entry.build().named_modules() if p.endswith(".mlp.experts")}
    assert expected <= wrapped and not {p for p in wrapped - expected if "classifier" not in p and "score" not in p}
    ours = _outputs(model, batch)
    assert_differs(ours, base_out)

    model.save(str(tmp_path / "dt"))
    theirs = peft.PeftModel.from_pretrained(entry.build(), str(tmp_path / "dt")).eval()
    # the injected base model: peft's seq2seq wrapper passes input_ids, which Whisper does not take
    assert_same(_outputs(theirs.get_base_model(), batch), ours, atol=1e-4)

    theirs.save_pretrained(str(tmp_path / "peft"))
    back = dt.load(entry.build(), str(tmp_path / "peft"))
    assert_same(_outputs(back, batch), ours, atol=1e-4)

    model.merge()
    assert_same(_outputs(model, batch), ours, atol=1e-4)


@pytest.mark.parametrize("family", [f for f, e in ZOO.items() if e.generates])
def test_merged_and_unmerged_adapters_generate_the_same_tokens(family):
    entry = ZOO[family]
    model = randomize(dt.attach(entry.build(), dt.LoraConfig(r=2, alpha=4, targets=["q", "v"])), scale=0.5)
    batch = {k: v[:1] for k, v in entry.batch().items() if k != "decoder_input_ids"}
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        unmerged = model.generate(**batch, **settings)
        model.merge()
        merged = model.generate(**batch, **settings)
    prompt = 1 if entry.batch_kind in ("seq2seq", "whisper") else batch["input_ids"].shape[-1]
    assert unmerged.shape[-1] > prompt
    assert torch.equal(unmerged, merged)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_mlp_aliases_on_fused_experts_say_why_a_layer_method_selects_nothing(family):
    with pytest.raises(dt.TargetError) as err:
        dt.attach(ZOO[family].build(), dt.IA3Config(targets=["up", "down"], feedforward=["down"]))
    assert "mlp.experts.gate_up_proj" in str(err.value) and "only LoRA" in str(err.value)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_a_peft_target_parameters_adapter_loads_with_peft_s_outputs(family, tmp_path):
    import peft
    entry = ZOO[family]
    batch = entry.batch()
    theirs = peft.get_peft_model(entry.build(), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])).eval()
    expected = _outputs(theirs, batch)
    assert_differs(expected, _outputs(entry.build(), batch))
    theirs.save_pretrained(str(tmp_path))
    ours = dt.load(entry.build(), str(tmp_path))
    assert_same(_outputs(ours, batch), expected, atol=1e-4)
    assert {type(layer).__name__ for _, layer in ours.adapter_layers()} == {"LoraLinear", "LoraExperts"}
    ours.merge()
    assert_same(_outputs(ours, batch), expected, atol=1e-4)
    ours.unmerge()
    assert_same(_outputs(ours, batch), expected, atol=1e-4)
    # the experts module sees routed tokens, not the batch's rows: it cannot give rows different adapters
    with pytest.raises(dt.AdapterError, match="LoraExperts layer cannot take part in a mixed-adapter batch"):
        ours(**batch, adapter_names=[ours.active_adapter] * batch["input_ids"].shape[0])


def test_only_the_fused_experts_can_be_adapted_and_train(tmp_path):
    import json
    entry = ZOO["mixtral"]
    model = dt.attach(entry.build(), dt.LoraConfig(r=2, targets=["up", "down", "gate"], init="random"))
    loss = model(**entry.batch(), labels=entry.batch()["input_ids"]).loss
    loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".experts.lora_" in n for n in trained)
    model.save(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_modules"] == [] and len(saved["target_parameters"]) == 4
