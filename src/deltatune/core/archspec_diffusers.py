"""Where the adaptable layers of diffusers' image models are, and what the aliases mean there.

Two layouts cover diffusers' denoisers: the UNet (``UNet2DConditionModel``: down, mid and up
stages of ResNets and transformer wrappers with ``proj_in``/``proj_out`` around self- and
cross-attention blocks) and the DiT (``SD3Transformer2DModel``, ``FluxTransformer2DModel``,
``PixArtTransformer2DModel``, ``Transformer2DModel``: a stack of ``transformer_blocks``, in
joint-attention models with a second, text stream ``add_*_proj`` / ``ff_context``).

This module knows those names only; :func:`deltatune.core.archspec.spec_for` turns a family
into an ``ArchSpec``. Nothing here imports diffusers: a model is recognised by its class's module.
"""

from __future__ import annotations

from torch import nn

# Block patterns split a path into (stack, index, path inside the block). On a UNet the "block"
# is the innermost numbered unit: a transformer block, a transformer wrapper or a ResNet.
_UNET_BLOCK = r"(?P<stack>.*(?:transformer_blocks|attentions|resnets))\.(?P<index>\d+)\.(?P<rest>.+)"
_DIT_BLOCK = r"(?P<stack>(?:.*\.)?(?:single_transformer_blocks|transformer_blocks))\.(?P<index>\d+)\.(?P<rest>.+)"


def _groups(parts: dict[str, str]) -> dict[str, str]:
    """The single aliases plus the group words every diffusion spec shares."""
    return {**parts,
            "attention": "|".join(f"(?:{parts[c]})" for c in ("q", "k", "v", "o")),
            "feed-forward": f"(?:{parts['up']})|(?:{parts['down']})"}


_UNET = _groups({
    "q": r"attn[12]\.to_q", "k": r"attn[12]\.to_k", "v": r"attn[12]\.to_v", "o": r"attn[12]\.to_out\.0",
    "up": r"ff\.net\.0\.proj", "down": r"ff\.net\.2",
}) | {
    "self-attention": r"attn1\.(?:to_q|to_k|to_v|to_out\.0)",
    "cross-attention": r"attn2\.(?:to_q|to_k|to_v|to_out\.0)",
    "proj": r"proj_in|proj_out",  # the transformer wrapper's projections in and out of the image grid
    "resnets": r"conv1|conv2|conv_shortcut",
}

# Joint-attention DiTs (SD3, Flux) have a second stream for the text tokens: q/k/v/o cover both.
_DIT = _groups({
    "q": r"attn[12]?\.(?:to_q|add_q_proj)", "k": r"attn[12]?\.(?:to_k|add_k_proj)",
    "v": r"attn[12]?\.(?:to_v|add_v_proj)", "o": r"attn[12]?\.(?:to_out\.0|to_add_out)",
    "up": r"(?:ff|ff_context)\.net\.0\.proj|proj_mlp",  # Flux's single blocks: proj_mlp / proj_out
    "down": r"(?:ff|ff_context)\.net\.2|proj_out",
})

FAMILIES: dict[str, tuple[dict[str, str], str]] = {
    "diffusers-unet": (_UNET, _UNET_BLOCK),
    "diffusers-dit": (_DIT, _DIT_BLOCK),
}


def is_diffusers_model(model: nn.Module) -> bool:
    """Whether ``model`` is one of diffusers' models (recognised without importing diffusers)."""
    return type(model).__module__.split(".", 1)[0] == "diffusers"


def diffusers_family(model: nn.Module) -> str | None:
    """``"diffusers-unet"`` or ``"diffusers-dit"`` for a diffusers denoiser, else None."""
    if not is_diffusers_model(model):
        return None
    if hasattr(model, "down_blocks") and hasattr(model, "up_blocks"):
        return "diffusers-unet"
    if hasattr(model, "transformer_blocks"):
        return "diffusers-dit"
    return None
