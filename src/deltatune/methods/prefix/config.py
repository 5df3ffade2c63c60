"""Prefix tuning configuration (Li & Liang 2021), stored with HF PEFT's field names."""

from __future__ import annotations

from dataclasses import dataclass

from deltatune.core.config import positive_int, require
from deltatune.methods.prompt.config import PromptLearningConfig


@dataclass(frozen=True)
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: ``num_virtual_tokens`` trainable key/value vectors put in front of the keys
    and values of every attention layer, through the model's key/value cache.

    Attributes:
        prefix_projection: train the prefixes through Li & Liang's reparameterisation (an
            embedding of width ``token_dim`` and a Linear-Tanh-Linear MLP); only the MLP's output
            is saved, as HF PEFT does, so a loaded adapter holds the folded prefixes.
        encoder_hidden_size: hidden width of that MLP; ``None`` means ``token_dim``.
        init_weights: ``None`` (random, N(0, 1)) or ``"zero"`` (zero prefixes; with the
            projection, a zero last layer).

    ``token_dim`` is the key/value width of one layer (key/value heads x head size) and
    ``num_attention_heads`` the key/value heads, as PEFT counts them. Encoder-decoder models (T5)
    get prefixes in the decoder's self-attention only: in transformers 5 their encoder ignores
    past_key_values. The prefix tensor is laid out as HF PEFT 0.21 lays it out for them
    (``num_transformer_submodules=2``), so files move both ways with identical outputs; in that
    layout decoder layer ``i`` reads the key/value pair stored for layer ``2i mod num_layers``
    (PEFT's arrangement), so part of the tensor is never read.
    """

    method = "prefix"
    peft_type = "PREFIX_TUNING"

    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init_weights: str | None = None

    def validate(self) -> None:
        super().validate()
        require(isinstance(self.prefix_projection, bool), "prefix_projection", self.prefix_projection, "True or False")
        positive_int("encoder_hidden_size", self.encoder_hidden_size, none="= token_dim")
        require(self.init_weights in (None, "zero"), "init_weights", self.init_weights, "None (random) or 'zero'")
