"""Prefix tuning (Li & Liang 2021): trainable key/value prefixes in every attention layer."""

from deltatune.core import registry
from deltatune.methods.prefix.adapter import PrefixAdapter
from deltatune.methods.prefix.config import PrefixTuningConfig
from deltatune.methods.prefix.method import PrefixTuningMethod

registry.register("prefix", PrefixTuningConfig, PrefixTuningMethod())

__all__ = ["PrefixTuningConfig", "PrefixAdapter"]
