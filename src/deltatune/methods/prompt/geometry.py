"""The model facts a virtual-token adapter needs, read once from the transformers config and
checked against what a config (or an adapter file) asks for."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from deltatune.errors import ConfigError


@dataclass(frozen=True)
class Geometry:
    """Sizes of one model, in the terms HF PEFT writes into prompt-learning configs."""

    num_layers: int
    token_dim: int
    num_attention_heads: int
    encoder_decoder: bool


def _first(config, *names: str):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(f"{type(model).__name__} has no transformers config; virtual-token methods need a "
                          f"transformers model")
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _layers(config) -> int:
    layers = _first(config, "num_hidden_layers", "num_layers", "n_layer")
    if layers is None:
        raise ConfigError("cannot tell the model's layer count from its config; set num_layers in the adapter config")
    return int(layers)


def _heads(config) -> int:
    heads = _first(config, "num_attention_heads", "n_head", "num_heads")
    if heads is None:
        raise ConfigError("cannot tell the model's attention heads from its config; set num_attention_heads")
    return int(heads)


def embedding_geometry(model: nn.Module) -> Geometry:
    """Geometry for methods that prepend embeddings: ``token_dim`` is the input embedding width."""
    config = _text_config(model)
    embeddings = model.get_input_embeddings()
    return Geometry(_layers(config), int(embeddings.weight.shape[1]), _heads(config),
                    bool(getattr(model.config, "is_encoder_decoder", False)))


def attention_geometry(model: nn.Module) -> Geometry:
    """Geometry for prefix tuning: ``token_dim`` is the key/value width of one layer, i.e.
    key/value heads times head size (smaller than the hidden size under grouped-query attention)."""
    config = _text_config(model)
    heads = _heads(config)
    kv_heads = int(_first(config, "num_key_value_heads") or heads)
    head_dim = _first(config, "head_dim", "d_kv")
    if head_dim is None:
        hidden = _first(config, "hidden_size", "n_embd", "d_model")
        if hidden is None or hidden % heads:
            raise ConfigError("cannot tell the model's attention head size from its config; set token_dim and "
                              "num_attention_heads in the adapter config")
        head_dim = hidden // heads
    return Geometry(_layers(config), kv_heads * int(head_dim), kv_heads,
                    bool(getattr(model.config, "is_encoder_decoder", False)))


def check_against(config, geometry: Geometry) -> None:
    """Raise :class:`ConfigError` where ``config`` names a size that differs from the model's."""
    for name in ("num_layers", "token_dim", "num_attention_heads"):
        wanted = getattr(config, name)
        actual = getattr(geometry, name)
        if wanted is not None and wanted != actual:
            raise ConfigError(f"the adapter config has {name}={wanted} but this model has {actual}: the adapter was "
                              f"made for another base model (leave {name} None to read it from the model)")
