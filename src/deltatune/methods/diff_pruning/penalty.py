"""The L0 penalty that a diff-pruning training loop adds to its loss, and the resulting sparsity."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from deltatune.errors import AdapterError
from deltatune.methods.diff_pruning.config import DiffPruningConfig
from deltatune.methods.diff_pruning.layer import DiffPruningLinear

if TYPE_CHECKING:
    from deltatune.core.model import AdaptedModel


def _layers(model: "AdaptedModel", name: str) -> list[DiffPruningLinear]:
    return [layer for _, layer in model.adapter_layers()
            if isinstance(layer, DiffPruningLinear) and name in layer.adapter_names]


def _diff_adapters(model: "AdaptedModel", names: list[str]) -> list[str]:
    chosen = [n for n in names if isinstance(model.configs.get(n), DiffPruningConfig)]
    if not chosen:
        raise AdapterError(f"no diff-pruning adapter among {names or 'no adapters'}; attach a "
                           f"DiffPruningConfig (and make it active) before asking for its L0 penalty")
    return chosen


def expected_density(model: "AdaptedModel", name: str) -> torch.Tensor:
    """The expected fraction of open gates of adapter ``name`` over all its layers (differentiable)."""
    layers = _layers(model, _diff_adapters(model, [name])[0])
    total = sum(layer.diff_log_alpha[name].numel() for layer in layers)
    return torch.stack([layer.expected_open(name) for layer in layers]).sum() / total


def l0_penalty(model: "AdaptedModel") -> torch.Tensor:
    """The L0 term to add to the training loss, summed over the active diff-pruning adapters.

    For each adapter it is ``l0_weight * max(0, expected_density - (1 - target_sparsity))``: it
    closes gates until the expected fraction of open ones reaches the target, then lets the task
    loss decide which stay open::

        loss = model(**batch).loss + l0_penalty(model)

    Raises :class:`AdapterError` when no active adapter is a diff-pruning one.
    """
    terms = []
    for name in _diff_adapters(model, list(model.active_adapters)):
        config: DiffPruningConfig = model.configs[name]
        excess = expected_density(model, name) - (1.0 - config.target_sparsity)
        terms.append(config.l0_weight * torch.clamp(excess, min=0.0))
    return torch.stack(terms).sum()


def sparsity(model: "AdaptedModel", name: str | None = None) -> float:
    """The fraction of diff entries that are exactly zero in eval mode (and so left out of the
    saved file) for adapter ``name`` (default: the active one)."""
    name = _diff_adapters(model, [name or model.active_adapter])[0]
    zeros = total = 0
    with torch.no_grad():
        for layer in _layers(model, name):
            diff = layer.delta_weight(name)
            zeros += int((diff == 0).sum())
            total += diff.numel()
    return zeros / total
