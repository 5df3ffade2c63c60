"""deltatune: parameter-efficient fine-tuning for Hugging Face transformers models.

    import deltatune as dt
    model = dt.attach(base, dt.LoraConfig(r=8, alpha=16, targets=["q", "v"]))
    print(model.report())
    model.save("out/adapter")
"""

from __future__ import annotations

import deltatune.compose  # noqa: F401  (gives AdaptedModel its combine and hot_swap)
from deltatune.api import attach, load
from deltatune.core.config import MethodConfig
from deltatune.core.loading import ModelSource, default_auto_class, load_model, load_tokenizer, resolve_model
from deltatune.core.model import AdaptedModel
from deltatune.core.routing import BASE_ADAPTER
from deltatune.errors import (AdapterError, AdapterFileError, ConfigError, DeltatuneError, ModelNotFoundError,
                              TargetError)
from deltatune.methods.adapters import AdapterConfig
from deltatune.methods.bitfit import BitFitConfig
from deltatune.methods.compacter import CompacterConfig
from deltatune.methods.diff_pruning import DiffPruningConfig
from deltatune.methods.freeze import FreezeConfig, FullConfig, HeadOnlyConfig
from deltatune.methods.ia3 import IA3Config
from deltatune.methods.lora import LoraConfig
from deltatune.methods.prefix import PrefixTuningConfig
from deltatune.methods.prompt import PromptTuningConfig, PTuningConfig
from deltatune.quant import prepare_for_kbit_training, quantization_report, quantize
from deltatune.version import __version__

__all__ = [
    "attach", "load", "AdaptedModel", "MethodConfig", "BASE_ADAPTER",
    "LoraConfig", "IA3Config", "AdapterConfig", "CompacterConfig", "PromptTuningConfig", "PTuningConfig",
    "PrefixTuningConfig", "BitFitConfig", "DiffPruningConfig", "FreezeConfig", "HeadOnlyConfig", "FullConfig",
    "resolve_model", "load_model", "default_auto_class", "load_tokenizer", "ModelSource",
    "quantize", "prepare_for_kbit_training", "quantization_report",
    "DeltatuneError", "ConfigError", "TargetError", "AdapterError", "AdapterFileError", "ModelNotFoundError",
]
