"""What an :class:`AdaptedModel` shows to tools written for Hugging Face models.

``transformers.Trainer`` and TRL read the model's ``forward`` signature to decide which dataset
columns to keep, and its quantization marks to decide whether it may be trained. The wrapper's
own ``forward(*args, **kwargs)`` would hide the base model's inputs, so the bound ``forward``
carries the base model's signature (plus ``adapter_names``).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

_SIGNATURE_CACHE = "_base_forward_signature"


def forward_signature(base_forward: Callable) -> inspect.Signature:
    """``base_forward``'s signature with the keyword-only ``adapter_names=None`` added."""
    try:
        params = list(inspect.signature(base_forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or C forward: show the generic one
        params = [inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
                  inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    if not any(p.name == "adapter_names" for p in params):
        extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        params.insert(at, extra)
    return inspect.Signature(params)


class with_base_signature:
    """Method decorator for ``AdaptedModel.forward``: ``inspect.signature(model.forward)`` is the
    base model's (computed once per model). Calls behave exactly as the plain method."""

    def __init__(self, func: Callable) -> None:
        self.func = func
        functools.update_wrapper(self, func)

    def __get__(self, obj: Any, objtype: type | None = None) -> Callable:
        if obj is None:
            return self.func
        bound = functools.partial(self.func, obj)
        signature = obj.__dict__.get(_SIGNATURE_CACHE)
        if signature is None:
            signature = forward_signature(obj.base_model.forward)
            obj.__dict__[_SIGNATURE_CACHE] = signature
        bound.__signature__ = signature
        return bound


class HuggingFaceFacade:
    """What ``AdaptedModel`` adds for Hugging Face tools besides the forward signature."""

    #: tells transformers' Trainer that trainable adapters sit on a (possibly quantized) base
    _hf_peft_config_loaded = True

    def save_pretrained(self, save_directory: str, **_ignored) -> None:
        """``save`` (the active adapter's folder) under the name Hugging Face tools call; options
        such as ``state_dict`` or ``safe_serialization`` do not apply to an adapter folder."""
        self.save(save_directory)
