"""Layer freezing and the baselines: ``freeze`` (train chosen blocks / embeddings / head),
``head-only`` and ``full`` fine-tuning."""

from deltatune.core import registry
from deltatune.methods.freeze.config import FreezeConfig, FullConfig, HeadOnlyConfig
from deltatune.methods.freeze.method import FreezeMethod
from deltatune.methods.freeze.select import blocks, train_paths

registry.register("freeze", FreezeConfig, FreezeMethod())
registry.register("head-only", HeadOnlyConfig, FreezeMethod())
registry.register("full", FullConfig, FreezeMethod())

__all__ = ["FreezeConfig", "HeadOnlyConfig", "FullConfig", "FreezeMethod", "blocks", "train_paths"]
