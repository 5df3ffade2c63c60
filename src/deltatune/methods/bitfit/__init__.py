"""BitFit: fine-tune only the bias terms (Ben Zaken et al. 2021)."""

from deltatune.core import registry
from deltatune.methods.bitfit.config import BitFitConfig
from deltatune.methods.bitfit.layer import BitFitLayer
from deltatune.methods.bitfit.method import BitFitMethod

registry.register("bitfit", BitFitConfig, BitFitMethod())

__all__ = ["BitFitConfig", "BitFitLayer"]
