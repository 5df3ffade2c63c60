"""The ``text-to-image`` task: train an adapter on a diffusers pipeline's denoiser.

The recipe's ``model`` is a diffusers pipeline folder (``model_index.json``; e.g. a Stable
Diffusion checkpoint), ``data.train`` a folder of images with a ``metadata.jsonl`` of
``{"file_name": ..., "<data.text>": caption}`` lines (the layout of HF's ``imagefolder``).
Each step encodes the images with the frozen VAE and the captions with the frozen text encoder,
noises the latents at random timesteps and trains the adapted UNet to predict the noise (or
the velocity, when the scheduler is set up for v-prediction): the usual denoising loss.
Each step draws a random batch of the examples. A LoRA adapter is saved in both layouts: PEFT's
(``dt.load``) and diffusers' (``pipe.load_lora_weights(folder)``); other methods in PEFT's.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F

from deltatune.errors import ConfigError
from deltatune.methods.lora import LoraConfig
from deltatune.train import distributed
from deltatune.train.callbacks import MetricsLog
from deltatune.train.data import read_rows
from deltatune.train.files import replace_dir, write_json, write_text
from deltatune.train.methods import AdapterMethod, resolve as resolve_method
from deltatune.train.recipe import Recipe

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def image_caption_rows(folder: Path, caption_field: str) -> list[tuple[Path, str]]:
    """``(image path, caption)`` pairs that ``folder/metadata.jsonl`` lists, checked."""
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise ConfigError(f"data.train for text-to-image is a folder of images with a metadata.jsonl of "
                          f'{{"file_name": ..., "{caption_field}": ...}} lines; {meta} does not exist')
    pairs = []
    for number, row in enumerate(read_rows(meta), 1):
        name, caption = row.get("file_name"), row.get(caption_field)
        if not isinstance(name, str) or caption is None:
            raise ConfigError(f"{meta}, entry {number}: needs \"file_name\" and {caption_field!r}")
        path = folder / name
        if (path.suffix.lower() not in _IMAGE_SUFFIXES or not path.is_file()
                or folder.resolve() not in path.resolve().parents):
            raise ConfigError(f"{meta}, entry {number}: {name!r} is not an image file in {folder}")
        pairs.append((path, str(caption)))
    if not pairs:
        raise ConfigError(f"{meta} lists no images")
    return pairs


def load_images(paths: list[Path], size: int) -> torch.Tensor:
    """The images as ``N x 3 x size x size`` in [-1, 1] (the VAE's input range)."""
    from PIL import Image, UnidentifiedImageError
    images = []
    for path in paths:
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        except (UnidentifiedImageError, OSError) as exc:
            raise ConfigError(f"{path} is not a readable image ({exc})") from None
        pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(size, size, 3)
        images.append(pixels.permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.stack(images)


def load_pipeline(source: str):
    """A diffusers pipeline from a folder (or hub name), checked to have what training needs."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        raise ConfigError("task text-to-image needs diffusers: pip install diffusers") from None
    if Path(source).is_dir() and not (Path(source) / "model_index.json").is_file():
        raise ConfigError(f"{source} is not a diffusers pipeline folder (it has no model_index.json)")
    pipe = DiffusionPipeline.from_pretrained(source)
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if getattr(pipe, c, None) is None]
    if missing:
        raise ConfigError(f"text-to-image trains UNet pipelines (Stable Diffusion style); {type(pipe).__name__} "
                          f"has no {', '.join(missing)}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def conditioning(pipe, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of the images and text-encoder states of the captions (both frozen, so once)."""
    latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
    tok = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    return latents, pipe.text_encoder(tok.input_ids.to(latents.device))[0]


def denoising_loss(unet, scheduler, latents: torch.Tensor, text: torch.Tensor, generator: torch.Generator):
    """MSE between the UNet's prediction on noised latents and the scheduler's training target."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    steps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    steps = steps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, steps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, steps)
    else:
        raise ConfigError(f"text-to-image trains epsilon or v_prediction schedulers, not {kind!r}")
    pred = unet(noisy, steps, encoder_hidden_states=text, return_dict=False)[0]
    return F.mse_loss(pred.float(), target.float())


def train_text_to_image(recipe: Recipe, *, resume: bool = False, overwrite: bool = False,
                        stream: TextIO | None = None, quiet: bool = False) -> dict:
    """Run a ``task: text-to-image`` recipe; returns the summary also written to summary.json."""
    began, spec, out = time.perf_counter(), recipe.train, Path(recipe.output_dir)
    if resume:
        raise ConfigError("text-to-image runs cannot be resumed yet; start again with --overwrite")
    if not overwrite and any((out / name).exists() for name in ("summary.json", "adapter")):
        raise ConfigError(f"{out} holds a previous run; pass --overwrite to start again")
    say = (lambda line: None) if quiet else (lambda line: print(line, file=stream or sys.stderr, flush=True))
    method = resolve_method(recipe.method)
    if not isinstance(method, AdapterMethod):
        raise ConfigError(f"text-to-image trains adapters (lora, ia3, ...), not {method.name!r}")
    if distributed.launched():
        raise ConfigError("text-to-image trains in one process; run it without torchrun")
    device = distributed.setup(spec.device).device
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    pairs = image_caption_rows(Path(recipe.resolve_path(recipe.data.train)), recipe.data.text)
    captions = [caption for _, caption in pairs]
    pipe = load_pipeline(recipe.model).to(device)
    if pipe.unet.dtype != torch.float32:  # a half-precision checkpoint: adapters train in fp32 here
        pipe.to(device, torch.float32)
    images = load_images([path for path, _ in pairs], pipe.unet.config.sample_size * pipe.vae_scale_factor)
    images = images.to(device)
    latents, text = conditioning(pipe, images, captions)
    model = method.apply(pipe.unet)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    batch = min(spec.batch_size, len(captions))
    per_epoch = math.ceil(len(captions) / batch)
    total = min(spec.max_steps or per_epoch * spec.epochs, per_epoch * spec.epochs)
    say(f"deltatune: text-to-image on {recipe.model} with {method.name}: {sum(p.numel() for p in params):,} "
        f"trainable parameters; {len(captions)} images, {total} steps")
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "recipe.yaml", recipe.to_yaml())
    (out / "metrics.jsonl").unlink(missing_ok=True)
    log, generator, losses = MetricsLog(out / "metrics.jsonl"), torch.Generator().manual_seed(spec.seed), []
    model.train()
    try:
        for step in range(1, total + 1):
            rows = torch.randperm(len(captions), generator=generator)[:batch]
            loss = denoising_loss(model, pipe.scheduler, latents[rows], text[rows], generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if spec.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
            if step % spec.log_every == 0 or step == total:
                log.write({"step": step, "loss": sum(losses[-spec.log_every:]) / len(losses[-spec.log_every:])})
    finally:
        log.close()
    model.eval()
    result, lora = out / method.result, isinstance(method.config, LoraConfig)
    formats = ("peft", "diffusers") if lora else ("peft",)  # diffusers' files hold LoRA only
    replace_dir(result, lambda tmp: [model.save(str(tmp), format=f) for f in formats])
    recent = losses[-spec.log_every:]
    summary = {"model": recipe.model, "task": "text-to-image", "method": method.name, "steps": total,
               "train_examples": len(captions), "train_loss": sum(recent) / len(recent), "losses": losses,
               "result": str(result), "formats": list(formats), "device": str(device),
               "wall_time_s": round(time.perf_counter() - began, 2)}
    write_json(out / "summary.json", summary)
    say(f"done in {summary['wall_time_s']:.0f}s; adapter ({' and '.join(formats)} files) -> {result}")
    return summary
