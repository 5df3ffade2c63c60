"""How the core recognises quantized base layers, without knowing any quantization library.

``deltatune.quant`` registers a handler per quantized layer class (by class name, so nothing is
imported until such a layer exists). Merging into a quantized layer goes through the handler:
dequantize to a plain ``nn.Linear``, add the delta, optionally quantize again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class QuantHandler:
    """Conversions between one quantized layer class and a full-precision ``nn.Linear``."""

    dequantize: Callable[[nn.Module], nn.Linear]
    requantize: Callable[[nn.Linear, nn.Module], nn.Module]  # (merged dense layer, original) -> quantized
    bits: Callable[[nn.Module], float]  # storage bits of the layer's weight (data + scales)


_HANDLERS: dict[str, QuantHandler] = {}


def register_quantized(class_name: str, handler: QuantHandler) -> None:
    """Teach the core to handle layers of (a subclass of) the class named ``class_name``."""
    _HANDLERS[class_name] = handler


def handler_for(module: nn.Module) -> QuantHandler | None:
    """The handler for a quantized layer, or None for an ordinary one."""
    for cls in type(module).__mro__:
        if cls.__name__ in _HANDLERS:
            return _HANDLERS[cls.__name__]
    return None


def is_quantized(module: nn.Module) -> bool:
    return handler_for(module) is not None
