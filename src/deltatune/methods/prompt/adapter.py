"""The model-level adapter of prompt tuning and P-tuning: virtual-token embeddings prepended to
the input embeddings (the encoder's, in encoder-decoder models)."""

from __future__ import annotations

import threading
from typing import ClassVar

import torch
from torch import nn

from deltatune.core.layer import ModelAdapter
from deltatune.errors import AdapterError, AdapterFileError
from deltatune.methods.prompt.encoders import SoftPrompt, folded

FILE_KEY = "prompt_embeddings"  # HF PEFT's key for every prompt-learning method
_SEQUENCE_OUTPUTS = ("logits", "last_hidden_state", "start_logits", "end_logits")
_PER_SEQUENCE_TASKS = ("SEQ_CLS",)


def held_prefix_length(cache) -> int:
    """Length of the prefix a deltatune prefix adapter put in ``cache`` (0 for none).

    A cache that holds tokens but did not come from a prefix adapter means the caller continues a
    cached sequence, which virtual tokens cannot join: that is refused."""
    if cache is None:
        return 0
    held = getattr(cache, "deltatune_prefix_length", None)
    if held is not None:
        return held
    if cache.get_seq_length() > 0:
        raise AdapterError("a virtual-token adapter must see the whole input: call the model without "
                           "past_key_values (generate() handles the cache itself)")
    return 0


class TableAdapter(ModelAdapter):
    """A model-level adapter whose trained state is one ``[rows, width]`` table of virtual-token
    vectors, made by ``source`` (a plain table, or an encoder whose output is the table). Files hold
    the table alone, under PEFT's ``prompt_embeddings``; loading one folds an encoder away.
    """

    #: the method and the table's layout, for the errors about files that do not fit
    kind: ClassVar[str] = "prompt"
    layout: ClassVar[str] = "num_virtual_tokens x token_dim"

    def __init__(self, source: nn.Module, *, pending_error: Exception | None = None) -> None:
        super().__init__()
        self.source = source
        # set when the starting values could not be made (e.g. no tokenizer); raised on first use
        # unless a saved state is loaded first, which makes the starting values irrelevant
        self._pending_error = pending_error

    def table(self) -> torch.Tensor:
        """The full ``[rows, width]`` table, as saved under ``prompt_embeddings``."""
        if self._pending_error is not None:
            raise self._pending_error
        return self.source()

    def fold(self) -> None:
        """Replace an encoder by a plain table of its current output (what inference needs)."""
        self.source = folded(self.source)

    def file_state(self) -> dict[str, torch.Tensor]:
        if isinstance(self.source, SoftPrompt):
            return {FILE_KEY: self.table()}
        with torch.no_grad():  # an encoder's output is saved as it stands, without a graph
            return {FILE_KEY: self.table().detach()}

    def load_file_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != {FILE_KEY}:
            raise AdapterFileError(f"a {self.kind} adapter file holds one tensor, {FILE_KEY!r}; this one has "
                                   f"{sorted(tensors)}")
        value = tensors[FILE_KEY]
        table = folded(self.source)  # checked before it replaces the encoder: a bad file changes nothing
        if tuple(value.shape) != tuple(table.weight.shape):
            raise AdapterFileError(f"{FILE_KEY} has shape {tuple(value.shape)} in the file but the model expects "
                                   f"{tuple(table.weight.shape)} ({self.layout}): another base model?")
        with torch.no_grad():
            table.weight.copy_(value.to(dtype=table.weight.dtype))
        self.source, self._pending_error = table, None


class VirtualTokenAdapter(TableAdapter):
    """Prepends ``num_virtual_tokens`` vectors from ``source`` to every input.

    ``source()`` returns a ``[rows, width]`` table (rows may exceed ``num_virtual_tokens`` in
    PEFT's two-submodule layout; the extra rows are never read, as in PEFT). Outputs with a
    sequence axis (``logits``, ``last_hidden_state``) are cut back to the real tokens.
    """

    def __init__(self, source: nn.Module, num_virtual_tokens: int, *, task_type: str | None,
                 encoder_decoder: bool, pending_error: Exception | None = None) -> None:
        super().__init__(source, pending_error=pending_error)
        self.num_virtual_tokens = num_virtual_tokens
        self.task_type = task_type
        self.encoder_decoder = encoder_decoder
        # per thread: (length of the input this adapter saw, whether the caller wants a tuple)
        self._calls: dict[int, tuple[int, bool]] = {}

    def prompts(self) -> torch.Tensor:
        """The ``[num_virtual_tokens, width]`` vectors that are prepended."""
        return self.table()[: self.num_virtual_tokens]

    # --- calls ----------------------------------------------------------------------------
    def transform_inputs(self, base_model: nn.Module, kwargs: dict) -> dict:
        return self._prepend(base_model, kwargs, generating=False)

    def transform_generate_inputs(self, base_model: nn.Module, kwargs: dict) -> dict:
        return self._prepend(base_model, kwargs, generating=True)

    def _prepend(self, base_model: nn.Module, kwargs: dict, generating: bool) -> dict:
        kw = dict(kwargs)
        if kw.get("encoder_outputs") is not None:
            raise AdapterError("a virtual-token adapter adds tokens to the encoder input: pass input_ids or "
                               "inputs_embeds, not encoder_outputs")
        held = held_prefix_length(kw.get("past_key_values"))
        # decoder-only generate: inputs_embeds must cover a prefix cache too (as placeholder rows)
        placeholders = held if generating and not self.encoder_decoder else 0
        embeds = kw.get("inputs_embeds")
        if embeds is None:
            ids = kw.get("input_ids")
            if ids is None:
                raise AdapterError("a virtual-token adapter needs input_ids or inputs_embeds")
            embeds = base_model.get_input_embeddings()(ids)
            if placeholders:
                embeds = torch.cat([embeds.new_zeros(embeds.shape[0], placeholders, embeds.shape[2]), embeds], dim=1)
        batch, seen = embeds.shape[0], embeds.shape[1] - placeholders
        prompts = self.prompts().to(device=embeds.device, dtype=embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kw["inputs_embeds"] = torch.cat([embeds[:, :placeholders], prompts, embeds[:, placeholders:]], dim=1)
        if generating and not self.encoder_decoder:
            # generate() keeps input_ids as the start of its output and feeds inputs_embeds once;
            # without a mask it would infer one from input_ids, which are shorter
            if kw.get("attention_mask") is None:
                kw["attention_mask"] = torch.ones(batch, placeholders + seen, dtype=torch.long, device=embeds.device)
        else:
            kw.pop("input_ids", None)
        self._extend_masks(kw, batch, embeds.device)
        if not generating:
            self._shift_targets(kw, batch, seen)
            want_tuple = kw.get("return_dict") is False
            if want_tuple:
                kw["return_dict"] = True
            self._calls[threading.get_ident()] = (seen, want_tuple)
        return kw

    def _extend_masks(self, kw: dict, batch: int, device) -> None:
        n = self.num_virtual_tokens
        mask = kw.get("attention_mask")
        if mask is not None:
            kw["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        types = kw.get("token_type_ids")
        if types is not None:
            kw["token_type_ids"] = torch.cat([types.new_zeros(batch, n), types], dim=1)
        positions = kw.get("position_ids")
        if positions is not None:
            # the virtual tokens take the first positions; the real ones move up by n
            first = positions[..., :1]
            steps = torch.arange(n, device=positions.device, dtype=positions.dtype)
            kw["position_ids"] = torch.cat([first + steps, positions + n], dim=-1)

    def _shift_targets(self, kw: dict, batch: int, seen: int) -> None:
        if self.encoder_decoder:
            return
        n = self.num_virtual_tokens
        labels = kw.get("labels")
        if (labels is not None and self.task_type not in _PER_SEQUENCE_TASKS and labels.dim() >= 2
                and labels.shape[1] == seen):
            # no loss on the virtual positions (HF PEFT's labels for causal LMs)
            kw["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        for key in ("start_positions", "end_positions"):
            if kw.get(key) is not None:
                kw[key] = kw[key] + n

    def transform_outputs(self, base_model: nn.Module, outputs, kwargs: dict):
        seen, want_tuple = self._calls.pop(threading.get_ident(), (None, False))
        if seen is None or not hasattr(outputs, "keys"):
            return outputs
        if not self.encoder_decoder and self.task_type not in _PER_SEQUENCE_TASKS:
            for key in _SEQUENCE_OUTPUTS:
                value = outputs.get(key)
                if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] > seen:
                    outputs[key] = value[:, -seen:]
        return outputs.to_tuple() if want_tuple else outputs
