"""How diff pruning attaches: wrap the targeted linear layers and add a gated diff to each."""

from __future__ import annotations

import torch
from torch import nn

from deltatune.core.layer import linear_kinds
from deltatune.core.wrapping import wrapped
from deltatune.core.registry import Method
from deltatune.core.targets import resolve_targets
from deltatune.methods.diff_pruning.config import DiffPruningConfig
from deltatune.methods.diff_pruning.layer import DiffPruningLinear


class DiffPruningMethod(Method):
    """Registered for ``"diff_pruning"``."""

    def training_penalty(self, model) -> torch.Tensor:
        """The L0 term the training loop adds to the loss (see :func:`l0_penalty`)."""
        from deltatune.methods.diff_pruning.penalty import l0_penalty

        return l0_penalty(model)

    def inject(self, model: nn.Module, config: DiffPruningConfig, name: str) -> list[str]:
        paths = resolve_targets(model, config.targets, kinds=linear_kinds(), layers=config.layers,
                                exclude=config.exclude)
        for path in paths:
            wrapped(model, path, DiffPruningLinear, "diff pruning").add_adapter(name, init_log_alpha=config.init_log_alpha)
        return paths
