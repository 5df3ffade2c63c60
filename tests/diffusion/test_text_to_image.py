"""The text-to-image recipe: a tiny Stable Diffusion pipeline (from config classes, saved to a
folder) trains a LoRA on a folder of image-caption pairs; the denoising loss falls and the saved
adapter loads in diffusers with the outputs ``dt.load`` gives."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.train.run import train
from deltatune.train.text_to_image import conditioning, denoising_loss, image_caption_rows, load_images
from tests.diffusion.tiny import denoise, tiny_pipeline, tiny_unet, unet_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"a red toy": (220, 30, 30), "a blue dog": (30, 30, 220)}


def _image_folder(root):
    """Eight 8x8 images: half "a red toy" (red, a bright square), half "a blue dog" (blue)."""
    root.mkdir()
    lines = []
    for i in range(8):
        caption, colour = list(COLOURS.items())[i % 2]
        img = Image.new("RGB", (8, 8), colour)
        img.paste((255, 255, 255), (i % 4, i % 4, i % 4 + 3, i % 4 + 3))
        img.save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _recipe(tmp_path, pipeline: bool = True, **train):
    folder = tmp_path / "pipeline"
    if pipeline:
        tiny_pipeline().save_pretrained(folder)
    return {"model": str(folder), "task": "text-to-image", "output_dir": str(tmp_path / "run"),
            "data": {"train": str(_image_folder(tmp_path / "images"))},
            "method": {"type": "lora", "r": 4, "alpha": 4, "targets": ["attention", "proj"]},
            "train": {"lr": 1e-2, "batch_size": 8, "log_every": 1, "threads": 1, **train}}


def _fixed_draw_loss(unet, latents, text) -> float:
    """The denoising loss on the same noise and timesteps every call (4 draws per image)."""
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return sum(denoising_loss(unet, DDIMScheduler(), latents, text, generator).item() for _ in range(4)) / 4


@pytest.mark.slow
def test_lora_training_lowers_the_denoising_loss_and_loads_in_diffusers(tmp_path):
    recipe = _recipe(tmp_path, max_steps=40, epochs=40)
    summary = train(recipe, quiet=True)
    losses = summary["losses"]
    assert len(losses) == 40 and sum(losses[-8:]) < sum(losses[:8])

    adapter = tmp_path / "run" / "adapter"
    pipe = tiny_pipeline()  # the same weights as the trained pipeline's base
    pairs = image_caption_rows(tmp_path / "images", "text")
    latents, text = conditioning(pipe, load_images([p for p, _ in pairs], 8), [c for _, c in pairs])
    before = _fixed_draw_loss(pipe.unet, latents, text)
    after = _fixed_draw_loss(dt.load(tiny_unet(), adapter), latents, text)
    assert after < 0.8 * before, (before, after)

    x = unet_inputs()
    ours = denoise(dt.load(tiny_unet(), adapter), x)
    pipe.load_lora_weights(str(adapter))
    torch.testing.assert_close(denoise(pipe.unet, x), ours, atol=1e-5, rtol=1e-5)


def test_a_few_steps_run_and_write_both_files(tmp_path):
    summary = train(_recipe(tmp_path, max_steps=2, epochs=2), quiet=True)
    assert summary["steps"] == 2 and all(loss > 0 for loss in summary["losses"])
    files = sorted(p.name for p in (tmp_path / "run" / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "pytorch_lora_weights.safetensors"]
    with pytest.raises(ConfigError, match="--overwrite"):
        train(_recipe(tmp_path / "again", max_steps=1) | {"output_dir": str(tmp_path / "run")}, quiet=True)


def test_a_folder_without_captions_is_refused(tmp_path):
    recipe = _recipe(tmp_path, pipeline=False, max_steps=1)
    (tmp_path / "images" / "metadata.jsonl").unlink()
    with pytest.raises(ConfigError, match="metadata.jsonl"):
        train(recipe, quiet=True)
    (tmp_path / "images" / "metadata.jsonl").write_text('{"file_name": "../0.png", "text": "a toy"}\n')
    with pytest.raises(ConfigError, match="not an image file"):
        train(recipe, quiet=True)
