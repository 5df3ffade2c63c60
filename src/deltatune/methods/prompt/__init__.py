"""Virtual-token methods that prepend embeddings to the input: prompt tuning (Lester et al. 2021)
and P-tuning (Liu et al. 2021)."""

from deltatune.core import registry
from deltatune.methods.prompt.adapter import VirtualTokenAdapter
from deltatune.methods.prompt.config import PromptLearningConfig, PromptTuningConfig, PTuningConfig
from deltatune.methods.prompt.method import PromptTuningMethod, PTuningMethod

registry.register("prompt", PromptTuningConfig, PromptTuningMethod())
registry.register("p_tuning", PTuningConfig, PTuningMethod())

__all__ = ["PromptLearningConfig", "PromptTuningConfig", "PTuningConfig", "VirtualTokenAdapter"]
