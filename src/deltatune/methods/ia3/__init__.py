"""(IA)^3: learned vectors rescaling keys, values and the feed-forward input (Liu et al. 2022)."""

from deltatune.core import registry
from deltatune.methods.ia3.config import IA3Config
from deltatune.methods.ia3.layer import IA3Linear
from deltatune.methods.ia3.method import IA3Method

registry.register("ia3", IA3Config, IA3Method())

__all__ = ["IA3Config", "IA3Linear"]
