"""How prefix tuning attaches: no layer is wrapped; one model-level adapter supplies the prefixes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.core.registry import Method
from deltatune.errors import ConfigError
from deltatune.methods.prefix.adapter import PrefixAdapter
from deltatune.methods.prefix.config import PrefixTuningConfig
from deltatune.methods.prefix.encoder import PrefixProjection
from deltatune.methods.prompt.encoders import SoftPrompt
from deltatune.methods.prompt.geometry import Geometry, attention_geometry, check_against


def _submodules(config: PrefixTuningConfig, geometry: Geometry) -> int:
    wanted = 2 if geometry.encoder_decoder else 1
    if config.num_transformer_submodules not in (None, wanted):
        kind = "an encoder-decoder" if geometry.encoder_decoder else "a decoder-only or encoder-only"
        raise ConfigError(f"prefix tuning on {kind} model uses num_transformer_submodules={wanted}, the config "
                          f"has {config.num_transformer_submodules}; leave it None")
    return wanted


class PrefixTuningMethod(Method):
    """Registered for ``"prefix"``."""

    def inject(self, model: nn.Module, config: PrefixTuningConfig, name: str) -> list[str]:
        return []

    def build_model_adapter(self, model: nn.Module, config: PrefixTuningConfig, name: str) -> PrefixAdapter:
        geometry = attention_geometry(model)
        check_against(config, geometry)
        submodules = _submodules(config, geometry)
        n, width = config.num_virtual_tokens, geometry.num_layers * 2 * geometry.token_dim
        device = model.get_input_embeddings().weight.device
        zero = config.init_weights == "zero"
        if config.prefix_projection:
            source = PrefixProjection(n, geometry.token_dim, config.encoder_hidden_size or geometry.token_dim, width,
                                      zero_init=zero, device=device)
        else:
            source = SoftPrompt(torch.zeros(n, width, device=device) if zero else torch.randn(n, width, device=device))
        return PrefixAdapter(source, num_virtual_tokens=n, num_layers=geometry.num_layers,
                             heads=geometry.num_attention_heads, submodules=submodules,
                             encoder_decoder=geometry.encoder_decoder)

    def file_extras(self, model, name: str) -> dict[str, Any]:
        """The model-dependent fields, resolved, as PEFT writes them into adapter_config.json."""
        config = model.configs[name]
        geometry = attention_geometry(model.base_model)
        return {"num_layers": geometry.num_layers, "token_dim": geometry.token_dim,
                "num_attention_heads": geometry.num_attention_heads,
                "num_transformer_submodules": _submodules(config, geometry),
                "encoder_hidden_size": config.encoder_hidden_size or geometry.token_dim}
