"""The toy + dog blend: two LoRA adapters on one UNet, combined with weights and in a mixed
batch, against diffusers' ``set_adapters`` on the same files."""

from __future__ import annotations

import math

import pytest
import torch

import deltatune as dt
from tests.diffusion.tiny import denoise, tiny_unet, unet_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["attention", "proj"]  # Linear and Conv2d layers


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """ "toy" (rank 4, alpha 8) and "dog" (rank 4, alpha 4), saved in diffusers' layout."""
    root = tmp_path_factory.mktemp("blend")
    for name, seed, alpha in (("toy", 1, 8), ("dog", 2, 4)):
        torch.manual_seed(seed)
        model = dt.attach(tiny_unet(), dt.LoraConfig(r=4, alpha=alpha, targets=TARGETS, init="random"), name)
        model.save(root / name, format="diffusers")
    return root


def _ours(files):
    model = dt.load(tiny_unet(), files / "toy", "toy")
    model.load(str(files / "dog"), "dog")
    return model


def _diffusers(files, *names, weights=None):
    unet = tiny_unet()
    for name in ("toy", "dog"):
        unet.load_lora_adapter(str(files / name), prefix="unet", adapter_name=name, use_safetensors=True)
    unet.set_adapters(list(names), weights=weights)
    return unet


def test_cat_combination_equals_set_adapters(files):
    x = unet_inputs()
    model = _ours(files)
    report = model.combine({"toy": 0.7, "dog": 0.5}, "blend", how="cat")
    assert set(report.ranks.values()) == {8}
    model.use("blend")
    expected = denoise(_diffusers(files, "toy", "dog", weights=[0.7, 0.5]), x)
    torch.testing.assert_close(denoise(model, x), expected, atol=1e-5, rtol=1e-5)


def test_linear_combination_follows_its_formula(files):
    """how="linear" keeps rank 4 and blends the factors: B' A' with A' = sum sign(w) sqrt(|w| s) A_i
    and B' = sum sqrt(|w| s) B_i (s = alpha / r), on Linear and Conv2d layers alike."""
    model = _ours(files)
    weights = {"toy": 0.7, "dog": -0.5}
    model.combine(weights, "blend", how="linear")
    scale = {"toy": 8 / 4, "dog": 4 / 4}
    for path, layer in model.adapter_layers():
        a = sum(math.copysign(math.sqrt(abs(w) * scale[n]), w) * layer.lora_A[n].weight for n, w in weights.items())
        b = sum(math.sqrt(abs(w) * scale[n]) * layer.lora_B[n].weight for n, w in weights.items())
        expected = torch.einsum("or,rihw->oihw", b.flatten(1), a) if a.dim() == 4 else b @ a
        torch.testing.assert_close(layer.delta_weight("blend"), expected, msg=path)


def test_svd_combination_at_full_rank_equals_the_weighted_sum_on_convolutions(files):
    """how="svd" factors each layer's weighted delta (a conv's as out x (in*kh*kw)); at rank 8 = 4 + 4
    nothing is cut, so the blend's delta is the weighted sum of the two updates on every layer."""
    model = _ours(files)
    weights = {"toy": 0.7, "dog": 0.5}
    report = model.combine(weights, "blend", how="svd", rank=8)
    assert report.min_energy_kept == pytest.approx(1.0, abs=1e-6)
    convs = 0
    for path, layer in model.adapter_layers():
        expected = sum(w * layer.delta_weight(n) for n, w in weights.items())
        torch.testing.assert_close(layer.delta_weight("blend"), expected, atol=1e-5, rtol=1e-4, msg=path)
        convs += expected.dim() == 4
    assert convs > 0


def test_mixed_batch_runs_each_image_through_its_adapter(files):
    x = unet_inputs(batch=3)
    out = _ours(files)(**x, adapter_names=["toy", "dog", "__base__"], return_dict=False)[0].detach()
    for row, names in enumerate((["toy"], ["dog"])):
        one = {k: v[row:row + 1] for k, v in x.items()}
        torch.testing.assert_close(out[row:row + 1], denoise(_diffusers(files, *names), one), atol=1e-5, rtol=1e-5)
    last = {k: v[2:] for k, v in x.items()}
    torch.testing.assert_close(out[2:], denoise(tiny_unet(), last), atol=1e-5, rtol=1e-5)
