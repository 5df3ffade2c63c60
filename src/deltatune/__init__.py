"""deltatune: parameter-efficient fine-tuning for Hugging Face transformers models.

    import deltatune as dt
    model = dt.attach(base, dt.LoraConfig(r=8, alpha=16, targets=["q", "v"]))
    print(model.report())
    model.save("out/adapter")
"""

from __future__ import annotations

from deltatune.api import attach, load
from deltatune.core.config import MethodConfig
from deltatune.core.model import BASE_ADAPTER, AdaptedModel
from deltatune.core.models import ModelSource, load_model, load_tokenizer, resolve_model
from deltatune.errors import (AdapterError, AdapterFileError, ConfigError, DeltatuneError, ModelNotFoundError,
                              TargetError)
from deltatune.methods.lora import LoraConfig
from deltatune.quant import prepare_for_kbit_training, quantization_report, quantize

__version__ = "0.1.0"

__all__ = [
    "attach", "load", "AdaptedModel", "MethodConfig", "LoraConfig", "BASE_ADAPTER",
    "resolve_model", "load_model", "load_tokenizer", "ModelSource",
    "quantize", "prepare_for_kbit_training", "quantization_report",
    "DeltatuneError", "ConfigError", "TargetError", "AdapterError", "AdapterFileError", "ModelNotFoundError",
]
