"""TIES, DARE and magnitude-pruning combinations, checked against peft's ``add_weighted_adapter``
on the same two adapters (loaded from peft's own files), on Linear, Conv1D, Embedding and Conv2d."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from tests.toy_models import layer_zoo, peft_lora

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = {"default": 0.8, "b": -0.6}  # a negative weight on purpose: its sign goes to A only
LAYERS = ["lin", "conv1d", "emb", "conv3"]


def two_adapters(tmp_path):
    """peft's model with random adapters "default" and "b" on every zoo layer, and deltatune's copy."""
    import peft
    reference = peft_lora(None, layer_zoo(), r=3, lora_alpha=6, target_modules=LAYERS, init_lora_weights=False)
    torch.manual_seed(1)
    reference.add_adapter("b", peft.LoraConfig(r=3, lora_alpha=4, target_modules=LAYERS, init_lora_weights=False))
    reference.save_pretrained(tmp_path)  # "default" in tmp_path, "b" in tmp_path / "b"
    ours = dt.load(layer_zoo(), tmp_path)
    ours.load(tmp_path / "b", "b")
    return reference, ours


def peft_delta(reference, layer: str, name: str) -> torch.Tensor:
    return reference.base_model.model.get_submodule(layer).get_delta_weight(name)


def our_delta(ours, layer: str, name: str) -> torch.Tensor:
    return ours.base_model.get_submodule(layer).delta_weight(name)


@pytest.mark.parametrize(("how", "majority_sign"), [("ties", "total"), ("ties", "frequency"),
                                                     ("magnitude_prune", "total"), ("linear", "total")])
def test_deterministic_merges_equal_peft_on_every_layer_type(how, majority_sign, tmp_path):
    reference, ours = two_adapters(tmp_path)
    options = {} if how == "linear" else {"density": 0.5}
    reference.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "merged", combination_type=how,
                                   majority_sign_method=majority_sign, **options)
    ours.combine(WEIGHTS, "merged", how=how, majority_sign=majority_sign, **options)
    for layer in LAYERS:
        expected = peft_delta(reference, layer, "merged")
        assert expected.abs().max() > 1e-3
        torch.testing.assert_close(our_delta(ours, layer, "merged"), expected, atol=1e-5, rtol=0)


def test_ties_follows_its_definition_on_one_tensor():
    from deltatune.compose.task_merging import merge_tensors
    x = torch.tensor([[3.0, -1.0, 0.5, 2.0]])
    y = torch.tensor([[-1.0, -2.0, 4.0, 0.1]])
    merged = merge_tensors([x, y], [1.0, 0.5], "ties", density=0.5, generator=torch.Generator())
    # kept: x -> [3, 0, 0, 2], y -> [0, -2, 4, 0]; elected signs of the sums: + - + +
    torch.testing.assert_close(merged, torch.tensor([[3.0, -1.0, 2.0, 2.0]]))


def _peft_factors(layer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name in layer.lora_embedding_A:
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _dare_candidates(how: str, x: torch.Tensor, y: torch.Tensor, density: float) -> torch.Tensor:
    """What each entry of a two-tensor DARE merge can be, per which sources survived the drop."""
    both = (x + y) / density if how == "dare_linear" else (x + y) / (2 * density)
    return torch.stack([torch.zeros_like(x), x / density, y / density, both])


@pytest.mark.parametrize("how", ["dare_linear", "dare_ties"])
def test_dare_keeps_the_density_fraction_rescaled_like_peft_and_repeats_with_a_seed(how, tmp_path):
    reference, ours = two_adapters(tmp_path)
    density = 0.4
    weights = {"default": 1.0, "b": 0.5}  # the same sign: TIES's election keeps both where both survive
    for name, seed in (("d1", 4), ("d2", 4), ("d3", 5)):
        ours.combine(weights, name, how=how, density=density, seed=seed)
    torch.manual_seed(0)
    reference.add_weighted_adapter(list(weights), list(weights.values()), "d", combination_type=how, density=density)
    kept = {"ours": [], "peft": []}
    for layer in LAYERS:
        mine, theirs = ours.base_model.get_submodule(layer), reference.base_model.model.get_submodule(layer)
        for side in (0, 1):
            x, y = ((w * mine.scaling[n]) ** 0.5 * mine.lora_factors(n)[side] for n, w in weights.items())
            candidates = _dare_candidates(how, x, y, density)
            for who, merged in (("ours", mine.lora_factors("d1")[side]), ("peft", _peft_factors(theirs, "d")[side])):
                # every entry is one of the rescaled outcomes of dropping or keeping each source
                gap = (candidates - merged.detach()).abs().amin(0)
                assert float(gap.max()) < 1e-5, f"{who} {layer}: an entry is no rescaled outcome"
                kept[who].append((merged != 0).flatten())
        torch.testing.assert_close(mine.delta_weight("d2"), mine.delta_weight("d1"), atol=0, rtol=0)
    fractions = {who: float(torch.cat(flags).float().mean()) for who, flags in kept.items()}
    either = 1 - (1 - density) ** 2  # an entry is non-zero when at least one source survives
    assert fractions["ours"] == pytest.approx(either, abs=0.06)
    assert fractions["peft"] == pytest.approx(either, abs=0.06)
    assert not torch.equal(ours.base_model.lin.delta_weight("d3"), ours.base_model.lin.delta_weight("d1"))


def test_merges_refuse_bad_options_and_dora_sources(tmp_path):
    _, ours = two_adapters(tmp_path)
    with pytest.raises(dt.ConfigError, match="needs density"):
        ours.combine(WEIGHTS, "x", how="ties")
    with pytest.raises(dt.ConfigError, match="needs density"):
        ours.combine(WEIGHTS, "x", how="dare_linear", density=1.5)
    with pytest.raises(dt.ConfigError, match="density applies to"):
        ours.combine(WEIGHTS, "x", how="cat", density=0.5)
    with pytest.raises(dt.ConfigError, match="majority_sign"):
        ours.combine(WEIGHTS, "x", how="ties", density=0.5, majority_sign="mean")
    ours.add(dt.LoraConfig(r=3, targets=["lin"], dora=True), "dora")
    with pytest.raises(dt.AdapterError, match="DoRA"):
        ours.combine({"default": 1.0, "dora": 1.0}, "x", how="ties", density=0.5)
    assert "x" not in ours.configs
