"""Tiny random diffusers models built from their configs (nothing downloaded), and inputs for them."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusion tests need diffusers: pip install -e '.[dev]'")

from diffusers import SD3Transformer2DModel, UNet2DConditionModel  # noqa: E402

TEXT_DIM = 32  # width of the (tiny) text encoder's hidden states


def tiny_unet() -> UNet2DConditionModel:
    """An SD-style UNet: two stages, cross-attention in the first, Conv2d proj_in/proj_out."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, norm_num_groups=8, attention_head_dim=8).eval()


def tiny_dit() -> SD3Transformer2DModel:
    """An SD3-style joint-attention DiT with two blocks."""
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=16,
        pooled_projection_dim=16).eval()


WORDS = ["[PAD]", "[UNK]", "[EOS]", "a", "toy", "dog", "red", "blue", "photo", "of", "sitting", "on", "grass"]


def tiny_tokenizer():
    """A word-level tokenizer over :data:`WORDS`, built in memory (CLIP's BPE files would be a download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=8, pad_token="[PAD]",
                                   unk_token="[UNK]", eos_token="[EOS]")


def tiny_pipeline():
    """A Stable Diffusion pipeline from config classes: tiny UNet, one-stage VAE, two-layer CLIP
    text encoder, DDIM scheduler; 8x8 images."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel
    unet = tiny_unet()
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                        norm_num_groups=8, layers_per_block=1, sample_size=8).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(WORDS), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=8, projection_dim=TEXT_DIM, pad_token_id=0, bos_token_id=2, eos_token_id=2)).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(), unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_inputs(batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(batch, 4, 8, 8, generator=g),
            "timestep": torch.tensor([10, 500][:batch] + [250] * max(0, batch - 2)),
            "encoder_hidden_states": torch.randn(batch, 5, TEXT_DIM, generator=g)}


def dit_inputs(batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "timestep": torch.tensor([10, 500][:batch] + [250] * max(0, batch - 2)),
            "encoder_hidden_states": torch.randn(batch, 5, TEXT_DIM, generator=g),
            "pooled_projections": torch.randn(batch, 16, generator=g)}


def denoise(model, inputs: dict) -> torch.Tensor:
    """The model's noise prediction for ``inputs`` (diffusers models return a tuple or an output)."""
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]
