"""Which modules a LoraConfig touches: component aliases per architecture, layer selection,
"all-linear", regexes, exclusions, per-module ranks, and the errors for selections that fail.

Expected module paths are written out from each model family's layout, not derived from the
alias tables in the source.
"""

from __future__ import annotations

import re

import pytest
import torch

import deltatune as dt
from tests.toy_models import (TOYS, assert_same, build_t5, is_head_copy, linear_paths, lora_paths, module_types,
                              peft_lora)

pytestmark = pytest.mark.usefixtures("one_thread")


def _t5(encoder_layers: int = 2, decoder_layers: int = 2, gated: bool = False):
    torch.manual_seed(0)
    return build_t5(encoder_layers, decoder_layers, gated).eval()


def _base(arch: str):
    return {"t5-gated": lambda: _t5(gated=True)}.get(arch, lambda: TOYS[arch].base())()


def selected(base, **config) -> set[str]:
    """The module paths LoRA wraps for ``config`` on ``base``."""
    return set(lora_paths(dt.attach(base, dt.LoraConfig(r=2, **config))))


def blocks(prefix: str, inner: str, n: int = 4) -> set[str]:
    return {f"{prefix}.{i}.{inner}" for i in range(n)}


def t5_paths(encoder: tuple[str, ...], decoder: tuple[str, ...], n: int = 2) -> set[str]:
    return {f"encoder.block.{i}.{p}" for i in range(n) for p in encoder} | \
           {f"decoder.block.{i}.{p}" for i in range(n) for p in decoder}


_BERT, _GPT2, _LLAMA = "bert.encoder.layer", "transformer.h", "model.layers"
_T5_SELF, _T5_CROSS = "layer.0.SelfAttention", "layer.1.EncDecAttention"
ALIASES = {
    ("bert", "q"): blocks(_BERT, "attention.self.query"),
    ("bert", "k"): blocks(_BERT, "attention.self.key"),
    ("bert", "v"): blocks(_BERT, "attention.self.value"),
    ("bert", "o"): blocks(_BERT, "attention.output.dense"),
    ("bert", "up"): blocks(_BERT, "intermediate.dense"),
    ("bert", "down"): blocks(_BERT, "output.dense"),  # the layer's, not attention.output.dense
    ("gpt2", "q"): blocks(_GPT2, "attn.c_attn"),
    ("gpt2", "k"): blocks(_GPT2, "attn.c_attn"),
    ("gpt2", "v"): blocks(_GPT2, "attn.c_attn"),
    ("gpt2", "o"): blocks(_GPT2, "attn.c_proj"),
    ("gpt2", "up"): blocks(_GPT2, "mlp.c_fc"),
    ("gpt2", "down"): blocks(_GPT2, "mlp.c_proj"),
    **{("llama", alias): blocks(_LLAMA, f"self_attn.{alias}_proj") for alias in "qkvo"},
    **{("llama", alias): blocks(_LLAMA, f"mlp.{alias}_proj") for alias in ("up", "down", "gate")},
    **{("t5", alias): t5_paths((f"{_T5_SELF}.{alias}",), (f"{_T5_SELF}.{alias}", f"{_T5_CROSS}.{alias}"))
       for alias in "qkvo"},
    ("t5", "up"): t5_paths(("layer.1.DenseReluDense.wi",), ("layer.2.DenseReluDense.wi",)),
    ("t5", "down"): t5_paths(("layer.1.DenseReluDense.wo",), ("layer.2.DenseReluDense.wo",)),
    ("t5-gated", "up"): t5_paths(("layer.1.DenseReluDense.wi_1",), ("layer.2.DenseReluDense.wi_1",)),
    ("t5-gated", "gate"): t5_paths(("layer.1.DenseReluDense.wi_0",), ("layer.2.DenseReluDense.wi_0",)),
    ("t5-gated", "down"): t5_paths(("layer.1.DenseReluDense.wo",), ("layer.2.DenseReluDense.wo",)),
}


@pytest.mark.parametrize("arch, alias", list(ALIASES), ids=[f"{a}-{c}" for a, c in ALIASES])
def test_alias_selects_exactly_the_expected_modules(arch, alias):
    assert selected(_base(arch), targets=[alias]) == ALIASES[arch, alias]


def test_aliases_combine_and_module_names_work_alongside():
    assert selected(TOYS["bert"].base(), targets=["q", "value", "down"]) == \
        ALIASES["bert", "q"] | ALIASES["bert", "v"] | ALIASES["bert", "down"]


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_default_targets_are_q_and_v(arch):
    assert selected(TOYS[arch].base()) == ALIASES[arch, "q"] | ALIASES[arch, "v"]


# --- layer selection ---------------------------------------------------------------------------

def _block_indices(paths: set[str]) -> dict[str, set[int]]:
    """{stack: block indices} parsed from paths like 'bert.encoder.layer.2....' / 'decoder.block.1....'."""
    out: dict[str, set[int]] = {}
    for p in paths:
        m = re.match(r"(.*?)\.(?:layer|h|layers|block)\.(\d+)\.", p)
        out.setdefault(m.group(1), set()).add(int(m.group(2)))
    return out


@pytest.mark.parametrize("layers, expected", [
    ("lower", {0, 1}), ("upper", {2, 3}), ("even", {0, 2}), ("odd", {1, 3}),
    ([0, 2], {0, 2}), ([3], {3}), (1, {1}), ("all", {0, 1, 2, 3}),
])
@pytest.mark.parametrize("arch, prefix", [("bert", "bert.encoder"), ("gpt2", "transformer"), ("llama", "model")])
def test_layer_selection_picks_the_right_blocks(arch, prefix, layers, expected):
    assert _block_indices(selected(TOYS[arch].base(), targets=["q"], layers=layers)) == {prefix: expected}


@pytest.mark.parametrize("layers, encoder, decoder", [
    ("lower", {0, 1}, {0}), ("upper", {2, 3}, {1}), ("even", {0, 2}, {0}), ("odd", {1, 3}, {1}),
    ([1], {1}, {1}), ([3], {3}, set()),
])
def test_t5_layer_selection_applies_to_each_stack(layers, encoder, decoder):
    paths = selected(_t5(encoder_layers=4, decoder_layers=2), targets=["q"], layers=layers)
    assert _block_indices(paths) == {k: v for k, v in (("encoder", encoder), ("decoder", decoder)) if v}
    # the decoder's blocks keep both their self- and cross-attention q
    assert {p for p in paths if p.startswith("decoder")} == \
        {f"decoder.block.{i}.{a}.q" for i in decoder for a in (_T5_SELF, _T5_CROSS)}


# --- all-linear, regexes, exclusions -----------------------------------------------------------

@pytest.mark.parametrize("toy", TOYS.values(), ids=TOYS.keys())
def test_all_linear_takes_every_linear_layer_but_the_heads(toy):
    base = toy.base()
    expected = set(linear_paths(base)) - set(toy.heads)
    assert set(toy.heads) <= set(linear_paths(base))
    assert selected(base, targets="all-linear") == expected
    peft_choice = set(lora_paths(peft_lora(toy, toy.base(), r=2, target_modules="all-linear").base_model.model))
    assert peft_choice == expected


def test_all_linear_with_upper_layers_keeps_only_modules_inside_those_blocks():
    paths = selected(TOYS["bert"].base(), targets="all-linear", layers="upper")
    assert paths == {p for p in linear_paths(TOYS["bert"].base()) if re.match(r"bert\.encoder\.layer\.[23]\.", p)}


def test_a_regex_string_matches_whole_paths():
    assert selected(TOYS["bert"].base(), targets=r"bert\.encoder\.layer\.[01]\.attention\.self\.(query|key)") == \
        {f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "key")}
    with pytest.raises(dt.TargetError):  # a regex must match the whole path, not a part of it
        dt.attach(TOYS["bert"].base(), dt.LoraConfig(targets="query"))


@pytest.mark.parametrize("exclude, dropped", [
    (["key", "pooler.dense"], lambda p: p.endswith((".key", "pooler.dense"))),
    (r".*\.layer\.0\..*", lambda p: ".layer.0." in p),
])
def test_exclude_by_names_or_regex(exclude, dropped):
    base = TOYS["bert"].base()
    expected = {p for p in linear_paths(base) if p != "classifier" and not dropped(p)}
    assert selected(base, targets="all-linear", exclude=exclude) == expected


def test_rank_and_alpha_patterns_set_each_modules_rank_and_scale():
    base = TOYS["bert"].base()
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = dt.attach(base, dt.LoraConfig(r=4, alpha=8, init="random", targets=["q", "v"],
                                          rank_pattern={"value": 2, r"layer\.1\.attention\.self\.query": 6},
                                          alpha_pattern={"value": 3}))
    params = dict(model.base_model.named_parameters())
    model.merge()
    for path in lora_paths(model):
        r, alpha = (2, 3) if path.endswith("value") else (6 if ".layer.1." in path else 4, 8)
        a, b = params[f"{path}.lora_A.default.weight"], params[f"{path}.lora_B.default.weight"]
        assert a.shape == (r, 32) and b.shape == (32, r), path
        merged = params[f"{path}.base_layer.weight"]
        assert_same(merged - original[f"{path}.weight"], alpha / r * b @ a, atol=1e-6)


def test_a_second_adapter_targets_layers_the_first_already_wraps():
    model = dt.attach(TOYS["bert"].base(), dt.LoraConfig(targets=["q"]), name="a")
    model.add(dt.LoraConfig(targets=["q", "k"]), name="b")

    def wrapped_by(name):
        return {n.split(".lora_A.")[0] for n, _ in model.base_model.named_parameters() if f".lora_A.{name}." in n}

    assert wrapped_by("a") == ALIASES["bert", "q"]
    assert wrapped_by("b") == ALIASES["bert", "q"] | ALIASES["bert", "k"]


# --- selections that fail ----------------------------------------------------------------------

def test_unknown_target_names_the_existing_modules_and_the_aliases():
    base = TOYS["bert"].base()
    with pytest.raises(dt.TargetError) as err:
        dt.attach(base, dt.LoraConfig(targets=["q", "querry"]))
    message = str(err.value)
    assert "querry" in message
    for name in ("query", "key", "value", "dense"):
        assert name in message
    for alias in ("q", "k", "v", "o", "up", "down"):
        assert re.search(rf"\b{alias}\b", message.split("querry", 1)[1]), alias
    assert module_types(base) == module_types(TOYS["bert"].base()), "a failed attach left wrappers behind"


@pytest.mark.parametrize("arch, alias", [("bert", "gate"), ("t5", "gate"), ("gpt2", "gate")])
def test_an_alias_the_architecture_lacks_is_a_target_error(arch, alias):
    with pytest.raises(dt.TargetError, match=alias):
        dt.attach(_base(arch), dt.LoraConfig(targets=[alias]))


@pytest.mark.parametrize("layers", [[4], [0, 9], [-1]])
def test_a_layer_index_out_of_range_is_a_target_error(layers):
    with pytest.raises(dt.TargetError, match=str(max(layers, key=abs))):
        dt.attach(TOYS["bert"].base(), dt.LoraConfig(targets=["q"], layers=layers))


def test_an_unknown_layer_word_is_a_config_error():
    with pytest.raises(dt.ConfigError, match="middle"):
        dt.attach(TOYS["bert"].base(), dt.LoraConfig(targets=["q"], layers="middle"))


@pytest.mark.parametrize("targets, kind", [
    (["attention"], "BertAttention"),
    (["LayerNorm"], "LayerNorm"),
    (r"bert\.encoder\.layer\.0", "BertLayer"),
])
def test_targeting_a_module_lora_cannot_wrap_is_a_target_error(targets, kind):
    base = TOYS["bert"].base()
    with pytest.raises(dt.TargetError, match=kind):
        dt.attach(base, dt.LoraConfig(targets=targets))
    assert module_types(base) == module_types(TOYS["bert"].base()), "a failed attach left wrappers behind"
    assert not any(is_head_copy(n) for n, _ in base.named_parameters())
