"""Bottleneck adapters: Houlsby, Pfeiffer and parallel placement (registered as ``adapters``)."""

from deltatune.core import registry
from deltatune.methods.adapters.config import AdapterConfig, BottleneckConfig
from deltatune.methods.adapters.layer import Bottleneck, BottleneckLayer
from deltatune.methods.adapters.method import BottleneckMethod

registry.register("adapters", AdapterConfig, BottleneckMethod())

__all__ = ["AdapterConfig", "BottleneckConfig", "Bottleneck", "BottleneckLayer", "BottleneckMethod"]
