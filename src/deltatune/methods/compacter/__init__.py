"""Compacter: bottleneck adapters with Kronecker-product (PHM) projections (registered as ``compacter``)."""

from deltatune.core import registry
from deltatune.methods.compacter.config import CompacterConfig
from deltatune.methods.compacter.layer import CompacterLayer
from deltatune.methods.compacter.method import CompacterMethod
from deltatune.methods.compacter.phm import PHMBottleneck, PHMLinear, kronecker_sum

registry.register("compacter", CompacterConfig, CompacterMethod())

__all__ = ["CompacterConfig", "CompacterLayer", "CompacterMethod", "PHMBottleneck", "PHMLinear", "kronecker_sum"]
