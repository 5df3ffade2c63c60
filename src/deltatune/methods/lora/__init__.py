"""LoRA: low-rank adaptation (Hu et al. 2021)."""

from deltatune.core import registry
from deltatune.methods.lora.config import LoraConfig
from deltatune.methods.lora.layer import LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear
from deltatune.methods.lora.method import LoraMethod

registry.register("lora", LoraConfig, LoraMethod())

__all__ = ["LoraConfig", "LoraLayer", "LoraLinear", "LoraEmbedding", "LoraConv2d"]
