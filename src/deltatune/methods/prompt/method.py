"""How prompt tuning and P-tuning attach: no layer is wrapped; one model-level adapter prepends
the virtual tokens."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.core.registry import Method
from deltatune.errors import ConfigError
from deltatune.methods.prompt.adapter import VirtualTokenAdapter
from deltatune.methods.prompt.config import PromptLearningConfig, PromptTuningConfig, PTuningConfig
from deltatune.methods.prompt.encoders import PromptEncoder, SoftPrompt
from deltatune.methods.prompt.geometry import Geometry, check_against, embedding_geometry
from deltatune.methods.prompt.init import initial_prompt


def _rows(config: PromptLearningConfig) -> int:
    # PEFT allocates num_virtual_tokens per submodule but only ever reads the first block
    return config.num_virtual_tokens * (config.num_transformer_submodules or 1)


def _geometry(model: nn.Module, config: PromptLearningConfig) -> Geometry:
    geometry = embedding_geometry(model)
    check_against(config, geometry)
    return geometry


def _resolved_fields(model: nn.Module, config: PromptLearningConfig) -> dict[str, Any]:
    """The model-dependent fields as PEFT writes them into adapter_config.json."""
    geometry = embedding_geometry(model)
    return {"num_layers": geometry.num_layers, "token_dim": geometry.token_dim,
            "num_attention_heads": geometry.num_attention_heads,
            "num_transformer_submodules": config.num_transformer_submodules or 1}


class PromptTuningMethod(Method):
    """Registered for ``"prompt"``."""

    def inject(self, model: nn.Module, config: PromptTuningConfig, name: str) -> list[str]:
        return []

    def build_model_adapter(self, model: nn.Module, config: PromptTuningConfig, name: str) -> VirtualTokenAdapter:
        geometry = _geometry(model, config)
        embeddings = model.get_input_embeddings()
        rows, pending = _rows(config), None
        try:
            values = initial_prompt(config, embeddings, rows, geometry.token_dim)
        except ConfigError as exc:
            # a saved adapter loaded next replaces these values, so only a later use without one fails
            values, pending = torch.zeros(rows, geometry.token_dim, device=embeddings.weight.device), exc
        return VirtualTokenAdapter(SoftPrompt(values), config.num_virtual_tokens, task_type=config.task_type,
                                   encoder_decoder=geometry.encoder_decoder, pending_error=pending)

    def file_extras(self, model, name: str) -> dict[str, Any]:
        return _resolved_fields(model.base_model, model.configs[name])


class PTuningMethod(Method):
    """Registered for ``"p_tuning"``."""

    def inject(self, model: nn.Module, config: PTuningConfig, name: str) -> list[str]:
        return []

    def build_model_adapter(self, model: nn.Module, config: PTuningConfig, name: str) -> VirtualTokenAdapter:
        geometry = _geometry(model, config)
        encoder = PromptEncoder(_rows(config), geometry.token_dim, config.encoder_hidden_size or geometry.token_dim,
                                kind=config.encoder_reparameterization_type, lstm_layers=config.encoder_num_layers,
                                dropout=config.encoder_dropout, device=model.get_input_embeddings().weight.device)
        return VirtualTokenAdapter(encoder, config.num_virtual_tokens, task_type=config.task_type,
                                   encoder_decoder=geometry.encoder_decoder)

    def file_extras(self, model, name: str) -> dict[str, Any]:
        config = model.configs[name]
        fields = _resolved_fields(model.base_model, config)
        fields["encoder_hidden_size"] = config.encoder_hidden_size or fields["token_dim"]
        return fields
