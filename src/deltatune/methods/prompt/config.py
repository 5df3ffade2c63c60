"""Configurations of the virtual-token methods: prompt tuning (Lester et al. 2021) and P-tuning
(Liu et al. 2021), stored with HF PEFT's field names and peft_types.

The model-dependent fields (``token_dim``, ``num_layers``, ``num_attention_heads``,
``num_transformer_submodules``) may stay ``None``: they are then read from the model when the
adapter is attached, and written into the saved adapter_config.json as PEFT expects them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deltatune.core.config import MethodConfig, fraction, is_int, one_of, positive_int, require
from deltatune.errors import ConfigError

_PROMPT_INITS = ("random", "text", "sample_vocab")
_ENCODER_TYPES = ("MLP", "LSTM")


@dataclass(frozen=True)
class PromptLearningConfig(MethodConfig):
    """Fields shared by the methods that add virtual tokens (prompt tuning, P-tuning, prefix tuning).

    Attributes:
        num_virtual_tokens: how many virtual tokens the adapter adds.
        token_dim: width of one virtual token; ``None`` reads it from the model.
        num_transformer_submodules: PEFT's count of transformer stacks that get virtual tokens
            (2 for encoder-decoder models in PEFT's prefix layout); ``None`` picks it per method.
        num_attention_heads: attention heads (key/value heads for prefix tuning); ``None`` reads
            it from the model.
        num_layers: transformer layers; ``None`` reads it from the model.
    """

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    def validate(self) -> None:
        super().validate()
        positive_int("num_virtual_tokens", self.num_virtual_tokens, hint="e.g. 20")
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            positive_int(name, getattr(self, name), none="read from the model")
        submodules = self.num_transformer_submodules
        require(submodules is None or (is_int(submodules) and submodules in (1, 2)), "num_transformer_submodules",
                submodules, "1, 2 or None (read from the model)")


@dataclass(frozen=True)
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``num_virtual_tokens`` trainable embeddings prepended to the input
    embeddings (on the encoder side of encoder-decoder models).

    Attributes:
        init: how the soft prompt starts: ``"random"`` (N(0, 1), as PEFT), ``"text"`` (the model's
            own word embeddings of ``init_text``'s tokens, repeated or cut to length), or
            ``"sample_vocab"`` (embeddings of randomly drawn vocabulary tokens).
        init_text: the text for ``init="text"``, e.g. ``"Classify the sentiment of this review:"``.
        tokenizer_name_or_path: tokenizer for ``init_text``: a local folder, a deltatune model alias
            (``"minilm"``), or a hub name where downloads are possible.
        tokenizer_kwargs: extra keyword arguments for ``AutoTokenizer.from_pretrained``
            (``trust_remote_code`` is always dropped).

    For causal LMs the forward's ``logits`` cover the real tokens only (HF PEFT also returns the
    virtual positions; its ``logits[:, num_virtual_tokens:]`` equal ours) and the loss is PEFT's:
    the labels get ``-100`` over the virtual positions.
    """

    method = "prompt"
    peft_type = "PROMPT_TUNING"
    peft_names = {"init": "prompt_tuning_init", "init_text": "prompt_tuning_init_text"}

    init: str = "random"
    init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def validate(self) -> None:
        super().validate()
        if isinstance(self.init, str):  # PEFT writes "TEXT", "RANDOM", "SAMPLE_VOCAB"
            object.__setattr__(self, "init", self.init.lower())
        one_of("init", self.init, _PROMPT_INITS)
        if self.init == "text":
            if not self.init_text:
                raise ConfigError("init='text' needs init_text, e.g. init_text='Classify the sentiment:'")
            if not self.tokenizer_name_or_path:
                raise ConfigError("init='text' needs tokenizer_name_or_path (the base model's tokenizer: a local "
                                  "folder or an alias such as 'minilm')")
        elif self.tokenizer_kwargs:
            raise ConfigError("tokenizer_kwargs only apply with init='text'; remove them or set init='text'")
        require(self.tokenizer_kwargs is None or isinstance(self.tokenizer_kwargs, dict), "tokenizer_kwargs",
                self.tokenizer_kwargs, "a dict")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["prompt_tuning_init"] = self.init.upper()
        return out


@dataclass(frozen=True)
class PTuningConfig(PromptLearningConfig):
    """P-tuning: the virtual tokens come out of a small trainable prompt encoder (an MLP, or a
    bidirectional LSTM followed by an MLP) over trainable input embeddings. They are prepended
    to the input embeddings like prompt tuning's.

    Only the encoder's output is saved (PEFT's ``prompt_embeddings``), so a loaded adapter holds
    those embeddings directly and no longer has the encoder.

    Attributes:
        encoder_reparameterization_type: ``"MLP"`` (three linear layers with ReLU) or ``"LSTM"``.
        encoder_hidden_size: hidden width of the encoder; ``None`` means ``token_dim``.
        encoder_num_layers: LSTM layers (the MLP always has PEFT's fixed three layers).
        encoder_dropout: dropout between LSTM layers.
    """

    method = "p_tuning"
    peft_type = "P_TUNING"

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        if isinstance(self.encoder_reparameterization_type, str):
            object.__setattr__(self, "encoder_reparameterization_type", self.encoder_reparameterization_type.upper())
        one_of("encoder_reparameterization_type", self.encoder_reparameterization_type, _ENCODER_TYPES)
        positive_int("encoder_hidden_size", self.encoder_hidden_size, none="= token_dim")
        positive_int("encoder_num_layers", self.encoder_num_layers)
        fraction("encoder_dropout", self.encoder_dropout)
