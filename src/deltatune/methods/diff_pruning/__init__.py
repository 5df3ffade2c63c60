"""Diff pruning: a sparse, L0-regularised diff on the weights (Guo et al. 2021).

Train with the penalty added to the loss::

    from deltatune.methods.diff_pruning import DiffPruningConfig, l0_penalty
    model = dt.attach(base, DiffPruningConfig(targets=["q", "v"], target_sparsity=0.99))
    loss = model(**batch).loss + l0_penalty(model)
"""

from deltatune.core import registry
from deltatune.methods.diff_pruning.config import DiffPruningConfig
from deltatune.methods.diff_pruning.layer import DiffPruningLinear
from deltatune.methods.diff_pruning.method import DiffPruningMethod
from deltatune.methods.diff_pruning.penalty import expected_density, l0_penalty, sparsity

registry.register("diff_pruning", DiffPruningConfig, DiffPruningMethod())

__all__ = ["DiffPruningConfig", "DiffPruningLinear", "l0_penalty", "expected_density", "sparsity"]
