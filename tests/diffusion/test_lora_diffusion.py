"""LoRA on diffusers' denoisers: the aliases resolve to the right layers, and the adapter keeps
the method contract on a UNet (Linear and Conv2d layers) and on an SD3-style DiT."""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from deltatune.errors import TargetError
from tests.diffusion.tiny import denoise, dit_inputs, tiny_dit, tiny_unet, unet_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def _paths(model, kind, *suffixes):
    """Independent reference: the modules of ``kind`` whose path ends with one of ``suffixes``."""
    return [n for n, m in model.named_modules() if isinstance(m, kind) and n.endswith(suffixes)]


def _adapted_paths(model):
    return [p for p, _ in model.adapter_layers()]


@pytest.mark.parametrize("targets, kind, suffixes", [
    (["q", "k", "v", "o"], torch.nn.Linear, (".to_q", ".to_k", ".to_v", ".to_out.0")),
    (["attention"], torch.nn.Linear, (".to_q", ".to_k", ".to_v", ".to_out.0")),
    (["cross-attention"], torch.nn.Linear, ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")),
    (["self-attention"], torch.nn.Linear, ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")),
    (["feed-forward"], torch.nn.Linear, ("ff.net.0.proj", "ff.net.2")),
    (["proj"], torch.nn.Conv2d, ("proj_in", "proj_out")),
    (["resnets"], torch.nn.Conv2d, ("conv1", "conv2", "conv_shortcut")),
])
def test_unet_aliases_select_the_named_layers(targets, kind, suffixes):
    unet = tiny_unet()
    expected = _paths(unet, kind, *suffixes)
    assert expected
    model = dt.attach(unet, dt.LoraConfig(r=2, targets=targets))
    assert _adapted_paths(model) == expected


def test_unet_all_linear_leaves_convolutions_alone():
    unet = tiny_unet()
    expected = _paths(unet, torch.nn.Linear, "")
    model = dt.attach(unet, dt.LoraConfig(r=2, targets="all-linear"))
    assert _adapted_paths(model) == expected


def test_dit_aliases_cover_both_streams_and_pick_blocks():
    dit = tiny_dit()
    joint = (".to_q", ".add_q_proj", ".to_out.0", ".to_add_out")
    expected = [p for p in _paths(dit, torch.nn.Linear, *joint) if ".transformer_blocks." in "." + p]
    model = dt.attach(dit, dt.LoraConfig(r=2, targets=["q", "o"]))
    assert sorted(_adapted_paths(model)) == sorted(expected)
    upper = dt.attach(tiny_dit(), dt.LoraConfig(r=2, targets=["q"], layers=[1]))
    assert sorted(_adapted_paths(upper)) == ["transformer_blocks.1.attn.add_q_proj", "transformer_blocks.1.attn.to_q"]


def test_unknown_target_on_a_unet_names_what_exists():
    with pytest.raises(TargetError, match="to_q"):
        dt.attach(tiny_unet(), dt.LoraConfig(targets=["query"]))


CASES = {
    "unet-attention+conv": (tiny_unet, unet_inputs, ["attention", "proj", "resnets"]),
    "dit-attention+ff": (tiny_dit, dit_inputs, ["attention", "feed-forward"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lora_contract_on_diffusion_models(case, tmp_path):
    build, inputs, targets = CASES[case]
    x = inputs()
    base_model = build()
    base = denoise(base_model, x)
    model = dt.attach(base_model, dt.LoraConfig(r=4, alpha=8, targets=targets, init="random"))
    adapted = denoise(model, x)
    assert not torch.allclose(adapted, base, atol=1e-4)

    # gradients reach adapter parameters only, and every one of them
    model.train()
    model(**x, return_dict=False)[0].square().mean().backward()
    model.eval()
    for name, p in model.named_parameters():
        is_adapter = ".lora_A." in name or ".lora_B." in name
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None) == is_adapter, name

    with model.disabled():
        torch.testing.assert_close(denoise(model, x), base)

    model.save(tmp_path / "peft")
    reloaded = dt.load(build(), tmp_path / "peft")
    torch.testing.assert_close(denoise(reloaded, x), adapted, rtol=0, atol=0)

    model.merge()
    torch.testing.assert_close(denoise(model, x), adapted, atol=1e-4, rtol=1e-4)
    model.unmerge()
    plain = copy.deepcopy(model).unload()
    torch.testing.assert_close(denoise(plain, x), base)
