"""Starting values of a soft prompt: random, the model's embeddings of a text, or of sampled
vocabulary tokens."""

from __future__ import annotations

import math

import torch
from torch import nn

from deltatune.errors import ConfigError, ModelNotFoundError


def load_init_tokenizer(name: str, kwargs: dict | None = None):
    """The tokenizer ``name`` names: a deltatune alias, a local folder, or a hub name."""
    from transformers import AutoTokenizer

    from deltatune.core.loading import resolve_model

    # loading a saved adapter must never run code from its tokenizer reference
    kwargs = {k: v for k, v in (kwargs or {}).items() if k != "trust_remote_code"}
    try:
        source = resolve_model(name)
        path, extra = source.path, source.pretrained_kwargs()
    except ModelNotFoundError:
        path, extra = name, {}
    try:
        return AutoTokenizer.from_pretrained(path, **extra, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer {name!r} for init='text' ({exc}); set tokenizer_name_or_path "
                          f"to a local tokenizer folder or a model alias such as 'minilm'") from None


def text_token_ids(text: str, tokenizer, rows: int) -> list[int]:
    """The ids of ``text`` (special tokens included, as PEFT does), repeated or cut to ``rows``."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise ConfigError(f"init_text {text!r} tokenizes to nothing; give a non-empty text")
    return (ids * math.ceil(rows / len(ids)))[:rows]


def embeddings_of(embeddings: nn.Module, ids: list[int] | torch.Tensor) -> torch.Tensor:
    """The rows of the model's input embedding table for ``ids``, as a detached fp32 tensor."""
    weight = embeddings.weight
    ids = torch.as_tensor(ids, dtype=torch.long, device=weight.device)
    with torch.no_grad():
        return embeddings(ids).detach().to(torch.float32).clone()


def initial_prompt(config, embeddings: nn.Module, rows: int, width: int) -> torch.Tensor:
    """The ``[rows, width]`` starting table for a prompt-tuning ``config``."""
    device = embeddings.weight.device
    if config.init == "text":
        tokenizer = load_init_tokenizer(config.tokenizer_name_or_path, config.tokenizer_kwargs)
        return embeddings_of(embeddings, text_token_ids(config.init_text, tokenizer, rows))
    if config.init == "sample_vocab":
        return embeddings_of(embeddings, torch.randint(0, embeddings.weight.shape[0], (rows,)))
    return torch.randn(rows, width, device=device)
