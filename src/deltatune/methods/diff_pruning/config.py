"""Diff pruning configuration (Guo et al. 2021). HF PEFT has no such method, so files name it
with deltatune's own ``deltatune_method`` key."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from deltatune.core.config import TargetedConfig, fraction, is_number, require


@dataclass(frozen=True)
class DiffPruningConfig(TargetedConfig):
    """A sparse additive change to each targeted weight: ``W + m * z``, where ``m`` is a dense
    trained diff and ``z`` a hard-concrete gate per entry (Louizos et al. 2018) that an L0 penalty
    pushes shut. Training adds :func:`deltatune.methods.diff_pruning.l0_penalty` to the loss.

    In eval mode the gates are deterministic, most of them exactly 0; a saved adapter keeps only
    the nonzero entries of ``m * z``.

    Attributes:
        targets: modules whose weight gets a diff: names or name suffixes, component aliases
            (``["q", "v"]``), a regex string matched against whole paths, or ``"all-linear"``
            (the default: every linear layer but the output and classification heads).
        layers: restrict to blocks: a list of indices, or ``"lower"``, ``"upper"``, ``"even"``,
            ``"odd"``, ``"all"``.
        exclude: names (suffixes) or a regex of modules to leave alone.
        target_sparsity: fraction of diff entries the penalty drives to zero; the paper keeps
            0.5% of the entries (0.995).
        l0_weight: weight of the penalty ``l0_weight * max(0, expected_density - (1 - target_sparsity))``,
            where ``expected_density`` is the mean probability that a gate is open.
        init_log_alpha: starting log-odds of every gate; the default 3.0 starts with the gates
            open (deterministic gate 1), the diff itself starts at zero.
    """

    method = "diff_pruning"
    peft_type = None

    target_words = ("all-linear",)

    targets: str | Sequence[str] | None = "all-linear"
    target_sparsity: float = 0.995
    l0_weight: float = 1.0
    init_log_alpha: float = 3.0

    def validate(self) -> None:
        super().validate()
        fraction("target_sparsity", self.target_sparsity, hint="e.g. 0.995 keeps 0.5% of the diff")
        require(is_number(self.l0_weight) and self.l0_weight >= 0, "l0_weight", self.l0_weight, "a number >= 0")
        require(is_number(self.init_log_alpha) and math.isfinite(self.init_log_alpha), "init_log_alpha",
                self.init_log_alpha, "a finite number")
