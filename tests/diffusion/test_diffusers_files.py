"""diffusers' LoRA files both ways: what deltatune saves loads in diffusers' own loaders (model
and pipeline) with equal outputs, and what diffusers saves loads with ``dt.load``."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from safetensors import safe_open
from safetensors.torch import save_file

import deltatune as dt
from deltatune.errors import AdapterError, AdapterFileError, ConfigError
from tests.diffusion.tiny import denoise, dit_inputs, tiny_dit, tiny_pipeline, tiny_unet, unet_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = "pytorch_lora_weights.safetensors"


def test_unet_adapter_loads_in_diffusers_with_equal_outputs(tmp_path):
    x = unet_inputs()
    model = dt.attach(tiny_unet(), dt.LoraConfig(r=4, alpha=8, targets=["attention", "proj", "resnets"],
                                                 rank_pattern={"proj_in": 2}, init="random"))
    ours = denoise(model, x)
    model.save(tmp_path, format="diffusers")
    with safe_open(str(tmp_path / WEIGHTS), framework="pt") as fh:
        assert all(k.startswith("unet.") for k in fh.keys())
        assert json.loads(fh.metadata()["lora_adapter_metadata"])["unet.lora_alpha"] == 8
    theirs = tiny_unet()
    theirs.load_lora_adapter(str(tmp_path), prefix="unet", use_safetensors=True, adapter_name="x")
    torch.testing.assert_close(denoise(theirs, x), ours, atol=1e-5, rtol=1e-5)


def test_dit_adapter_loads_in_diffusers_with_equal_outputs(tmp_path):
    x = dit_inputs()
    model = dt.attach(tiny_dit(), dt.LoraConfig(r=4, alpha=4, targets=["attention", "feed-forward"], init="random"))
    ours = denoise(model, x)
    model.save(tmp_path, format="diffusers")
    theirs = tiny_dit()
    theirs.load_lora_adapter(str(tmp_path), use_safetensors=True)  # default prefix: "transformer"
    torch.testing.assert_close(denoise(theirs, x), ours, atol=1e-5, rtol=1e-5)


def test_pipeline_load_lora_weights_gives_the_same_images(tmp_path):
    pipe = tiny_pipeline()
    model = dt.attach(pipe.unet, dt.LoraConfig(r=4, alpha=8, targets=["attention", "proj"], init="random"))
    model.save(tmp_path, format="diffusers")
    call = {"prompt": ["a toy"], "num_inference_steps": 2, "output_type": "latent", "guidance_scale": 1.0}
    ours = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    theirs_pipe = tiny_pipeline()
    theirs_pipe.load_lora_weights(str(tmp_path))
    theirs = theirs_pipe(**call, generator=torch.Generator().manual_seed(0)).images
    plain = tiny_pipeline()(**call, generator=torch.Generator().manual_seed(0)).images
    assert not torch.allclose(ours, plain, atol=1e-4)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_diffusers_saved_adapter_loads_with_dt_load(tmp_path):
    x = unet_inputs()
    theirs = tiny_unet()
    theirs.add_adapter(PeftLoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                      target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]))
    expected = denoise(theirs, x)
    theirs.save_lora_adapter(str(tmp_path))
    model = dt.load(tiny_unet(), tmp_path)
    torch.testing.assert_close(denoise(model, x), expected, atol=1e-5, rtol=1e-5)
    assert model.configs["default"].alpha == 16


def test_diffusers_saved_dit_adapter_loads_with_dt_load(tmp_path):
    x = dit_inputs()
    theirs = tiny_dit()
    theirs.add_adapter(PeftLoraConfig(r=2, lora_alpha=3, init_lora_weights=False,
                                      target_modules=["to_q", "add_k_proj", "to_add_out", "ff_context.net.2"]))
    expected = denoise(theirs, x)
    theirs.save_lora_adapter(str(tmp_path))
    torch.testing.assert_close(denoise(dt.load(tiny_dit(), tmp_path), x), expected, atol=1e-5, rtol=1e-5)


def test_pipeline_file_without_metadata_reads_as_diffusers_does(tmp_path):
    """A pipeline-style file (``unet.`` and ``text_encoder.`` keys, no config): ranks from the
    factors, alpha = rank; diffusers' own loader on the same file is the reference."""
    torch.manual_seed(3)
    model = dt.attach(tiny_unet(), dt.LoraConfig(r=4, alpha=4, targets=["q", "v"], rank_pattern={"attn2": 2},
                                                 init="random"))
    model.save(tmp_path / "ours", format="diffusers")
    with safe_open(str(tmp_path / "ours" / WEIGHTS), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    tensors["text_encoder.layers.0.q_proj.lora_A.weight"] = torch.zeros(2, 32)
    (tmp_path / "bare").mkdir()
    save_file(tensors, str(tmp_path / "bare" / WEIGHTS))
    reference = tiny_unet()
    reference.load_lora_adapter(str(tmp_path / "bare"), prefix="unet", use_safetensors=True)
    x = unet_inputs()
    with pytest.warns(UserWarning, match="text_encoder"):
        loaded = dt.load(tiny_unet(), tmp_path / "bare")
    torch.testing.assert_close(denoise(loaded, x), denoise(reference, x), atol=1e-5, rtol=1e-5)


def test_kohya_and_old_layouts_are_refused_with_the_way_out(tmp_path):
    kohya = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    torch.manual_seed(0)
    save_file({f"{kohya}.lora_down.weight": torch.randn(2, 16), f"{kohya}.lora_up.weight": torch.randn(16, 2),
               f"{kohya}.alpha": torch.tensor(4.0)}, str(tmp_path / WEIGHTS))
    with pytest.raises(AdapterFileError, match="kohya.*save_lora_adapter"):
        dt.load(tiny_unet(), tmp_path)

    # the conversion the message names, then dt.load gives what diffusers gives
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(tmp_path), adapter_name="x")
    pipe.unet.save_lora_adapter(str(tmp_path / "converted"), adapter_name="x")
    x = unet_inputs()
    converted = dt.load(tiny_unet(), tmp_path / "converted")
    torch.testing.assert_close(denoise(converted, x), denoise(pipe.unet, x), atol=1e-5, rtol=1e-5)
    assert converted.configs["default"].alpha == 4

    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight":
               torch.zeros(2, 16)}, str(tmp_path / WEIGHTS))
    with pytest.raises(AdapterFileError, match="old attention-processor layout"):
        dt.load(tiny_unet(), tmp_path)


def test_diffusers_format_refuses_what_diffusers_cannot_read(tmp_path):
    model = dt.attach(tiny_unet(), dt.IA3Config(targets=["to_k", "to_v", "ff.net.2"], feedforward=["ff.net.2"]))
    with pytest.raises(AdapterError, match="LoRA"):
        model.save(tmp_path, format="diffusers")
    with pytest.raises(ConfigError, match="format must be"):
        model.save(tmp_path, format="kohya")
    assert not any(tmp_path.iterdir())
