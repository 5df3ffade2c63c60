"""The Compacter wrapper: a bottleneck wrapper whose blocks are PHM bottlenecks sharing one
slow-weight tensor per adapter.

Every wrapped layer holds the *same* ``nn.Parameter`` as ``phm_rule[name]`` (so gradients from
all layers accumulate in it, and ``model.parameters()`` lists it once). Only the first layer the
adapter was added to, its owner, reports it in :meth:`adapter_state`, so an adapter file stores
it once, as ``<first wrapped module>.phm_rule``, and loading copies it in once.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.methods.adapters.layer import BottleneckLayer


class CompacterLayer(BottleneckLayer):
    """Holds ``base_layer``, per adapter a :class:`~deltatune.methods.compacter.phm.PHMBottleneck`
    in ``compacter`` and the adapter's shared slow weights in ``phm_rule``."""

    adapter_attrs = ("compacter", "phm_rule")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)  # creates self.compacter
        self.phm_rule = nn.ParameterDict()
        self._rule_owner: set[str] = set()

    def add_compacter(self, name: str, block: nn.Module, rule: nn.Parameter, placement: str, scaling: float,
                      *, owner: bool) -> None:
        """Add adapter ``name``; ``rule`` is the adapter's shared slow-weight parameter, saved by the
        owner layer only."""
        self.phm_rule[name] = rule
        if owner:
            self._rule_owner.add(name)
        self.add_adapter(name, block, placement, scaling)

    def _forget(self, name: str) -> None:
        super()._forget(name)
        self._rule_owner.discard(name)

    def adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        rule = self.phm_rule[name]
        return (self.compacter[name](x.to(rule.dtype), rule) * self.scaling[name]).to(x.dtype)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        state = super().adapter_state(name)
        if name not in self._rule_owner:
            state.pop("phm_rule", None)
        return state
