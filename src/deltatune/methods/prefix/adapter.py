"""The model-level adapter of prefix tuning: per-layer key/value prefixes handed to the model as
a pre-filled key/value cache, with the attention mask widened to match."""

from __future__ import annotations

import torch
from torch import nn

from deltatune.errors import AdapterError, ConfigError
from deltatune.methods.prefix.cache import LENGTH_ATTR, extend_cache, keys_and_values
from deltatune.methods.prompt.adapter import TableAdapter


def _batch_size(kw: dict) -> int:
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids"):
        if kw.get(key) is not None:
            return kw[key].shape[0]
    raise AdapterError("a prefix adapter needs input_ids or inputs_embeds to know the batch size")


def _sequence_length(kw: dict) -> int:
    embeds = kw.get("inputs_embeds")
    return (embeds if embeds is not None else kw["input_ids"]).shape[1]


def _generation_fanout(base_model: nn.Module, kw: dict) -> int:
    """How many rows generate() makes of each input row (beams, returned sequences)."""
    gc = kw.get("generation_config") or getattr(base_model, "generation_config", None)
    beams = kw.get("num_beams") or getattr(gc, "num_beams", None) or 1
    sequences = kw.get("num_return_sequences") or getattr(gc, "num_return_sequences", None) or 1
    return max(beams, sequences)


class PrefixAdapter(TableAdapter):
    """Puts ``num_virtual_tokens`` key/value vectors in front of every attention layer's keys and
    values. ``source()`` returns the flat ``[tokens, num_layers * 2 * token_dim]`` table; folding
    replaces the reparameterisation MLP by its output."""

    kind = "prefix"
    layout = "num_virtual_tokens x num_layers*2*token_dim"

    def __init__(self, source: nn.Module, *, num_virtual_tokens: int, num_layers: int, heads: int,
                 submodules: int, encoder_decoder: bool) -> None:
        super().__init__(source)
        self.num_virtual_tokens = num_virtual_tokens
        self.num_layers = num_layers
        self.heads = heads
        self.submodules = submodules
        self.encoder_decoder = encoder_decoder

    # --- calls ----------------------------------------------------------------------------
    def transform_inputs(self, base_model: nn.Module, kwargs: dict) -> dict:
        return self._with_prefix(base_model, kwargs, generating=False)

    def transform_generate_inputs(self, base_model: nn.Module, kwargs: dict) -> dict:
        gc = kwargs.get("generation_config") or getattr(base_model, "generation_config", None)
        if kwargs.get("use_cache", getattr(gc, "use_cache", True)) is False:
            raise AdapterError("prefix tuning lives in the key/value cache: generate with use_cache=True")
        return self._with_prefix(base_model, kwargs, generating=True)

    def _with_prefix(self, base_model: nn.Module, kwargs: dict, generating: bool) -> dict:
        if not generating and base_model.training and getattr(base_model, "is_gradient_checkpointing", False):
            # recomputing a layer would append its keys to the cache a second time
            raise ConfigError("prefix tuning cannot train with gradient checkpointing; call "
                              "model.gradient_checkpointing_disable()")
        kw = dict(kwargs)
        cache = kw.get("past_key_values")
        if cache is not None and getattr(cache, LENGTH_ATTR, None) is None:
            if cache.get_seq_length() > 0:
                raise AdapterError("a prefix adapter builds the key/value cache itself: call the model without "
                                   "past_key_values (generate() handles the cache)")
            cache = None
        batch = _batch_size(kw)
        rows = batch * (_generation_fanout(base_model, kw) if generating else 1)
        dtype = base_model.get_input_embeddings().weight.dtype
        pairs = keys_and_values(self.table(), rows, self.num_layers, self.heads, self.submodules, dtype)
        kw["past_key_values"] = extend_cache(cache, pairs, self.encoder_decoder)
        n = self.num_virtual_tokens
        device = pairs[0][0].device
        mask_key = "decoder_attention_mask" if self.encoder_decoder else "attention_mask"
        mask = kw.get(mask_key)
        if mask is None and generating and not self.encoder_decoder:
            # without a mask generate() would infer one as long as input_ids and cut the input by n
            mask = torch.ones(batch, _sequence_length(kw), dtype=torch.long, device=device)
        if mask is not None:
            kw[mask_key] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
        if not self.encoder_decoder:
            if kw.get("position_ids") is not None:
                kw["position_ids"] = kw["position_ids"] + n
            embeds = kw.get("inputs_embeds")
            if generating and embeds is not None:
                # generate() takes inputs_embeds to span the cached positions too: pad them in front
                kw["inputs_embeds"] = torch.cat([embeds.new_zeros(embeds.shape[0], n, embeds.shape[2]), embeds], dim=1)
        return kw

    def transform_outputs(self, base_model: nn.Module, outputs, kwargs: dict):
        cache = kwargs.get("past_key_values")
        held = getattr(cache, LENGTH_ATTR, None)
        if held is not None:
            target = getattr(cache, "self_attention_cache", cache)
            unread = [i for i in range(self.num_layers) if target.get_seq_length(i) <= held]
            if unread:
                raise ConfigError(f"{type(base_model).__name__} did not read the prefix in layers {unread}: this "
                                  f"architecture does not take key/value prefixes through past_key_values in this "
                                  f"transformers version; use prompt tuning or LoRA for it")
        return outputs
