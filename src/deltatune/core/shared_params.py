"""Base parameters that an adapter trains in place, such as LoRA's ``bias="all"`` option.

Several adapters may train the same bias tensor, so each adapter keeps its own values and the
live parameter holds those of the one adapter that owns it now; disabling or removing puts the
base model's values back. The optimizer's references stay valid: values are copied in place.

Parameters are tracked by identity, not by name: wrapping or unwrapping a layer renames its bias
(``q.bias`` <-> ``q.base_layer.bias``) but keeps the tensor. Names are looked up when a file is
written or read.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.errors import AdapterError, AdapterFileError


def canonical_name(name: str) -> str:
    """A parameter name without the ``base_layer.`` segments that adapter wrappers insert."""
    return name.replace(".base_layer.", ".")


class SharedParameterValues:
    """Per-adapter values of shared base parameters, and which adapter's values are live."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._params: dict[int, nn.Parameter] = {}
        self._base: dict[int, torch.Tensor] = {}
        self._values: dict[str, dict[int, torch.Tensor]] = {}
        self.owner: str | None = None

    def add(self, adapter: str, names: list[str]) -> None:
        """Start ``adapter``'s values of the parameters ``names`` from the base model's values."""
        if not names:
            return
        params = dict(self._model.named_parameters())
        for n in names:
            p = params[n]
            if id(p) not in self._params:
                self._params[id(p)] = p
                self._base[id(p)] = p.detach().clone()
        self._values[adapter] = {id(params[n]): self._base[id(params[n])].clone() for n in names}

    def names(self, adapter: str) -> dict[str, int]:
        """Current parameter names of what ``adapter`` trains, mapped to their keys."""
        mine = self._values.get(adapter)
        if not mine:
            return {}
        return {n: id(p) for n, p in self._model.named_parameters() if id(p) in mine}

    def values(self, adapter: str) -> dict[str, torch.Tensor]:
        """``adapter``'s current values by parameter name (the live tensors while it owns them)."""
        names = self.names(adapter)
        if adapter == self.owner:
            return {n: self._params[key] for n, key in names.items()}
        return {n: self._values[adapter][key] for n, key in names.items()}

    def set_values(self, adapter: str, values: dict[str, torch.Tensor]) -> None:
        """Replace ``adapter``'s values, given by parameter name (checked against shapes first)."""
        if not values:
            return
        by_name = {canonical_name(n): key for n, key in self.names(adapter).items()}
        for n, v in values.items():
            key = by_name.get(canonical_name(n))
            if key is None:
                raise AdapterFileError(f"{n} is not a parameter adapter {adapter!r} trains")
            if v.shape != self._base[key].shape:
                raise AdapterFileError(f"{n}: shape {tuple(v.shape)} in the file but "
                                       f"{tuple(self._base[key].shape)} in the model")
        stored = self._values[adapter]
        for n, v in values.items():
            key = by_name[canonical_name(n)]
            stored[key] = v.detach().to(self._base[key].dtype).clone()
        if adapter == self.owner:
            self._write(stored)

    def _write(self, values: dict[int, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, v in values.items():
                self._params[key].copy_(v)

    def activate(self, adapter: str | None) -> None:
        """Make ``adapter``'s values live (None: the base model's)."""
        if adapter == self.owner:
            return
        if self.owner is not None:
            mine = self._values[self.owner]
            self._values[self.owner] = {key: self._params[key].detach().clone() for key in mine}
            self._write({key: self._base[key] for key in mine})
        if adapter is not None and adapter in self._values:
            self._write(self._values[adapter])
            self.owner = adapter
        else:
            self.owner = None

    def owner_among(self, names: list[str]) -> str | None:
        """The one adapter in ``names`` that trains shared parameters, if any (at most one may)."""
        owners = [n for n in names if n in self._values]
        if len(owners) > 1:
            raise AdapterError(f"adapters {owners} both train base parameters (the bias option) and cannot be "
                               f"active together; use one at a time")
        return owners[0] if owners else None

    def remove(self, adapter: str) -> None:
        if adapter == self.owner:
            self.activate(None)
        self._values.pop(adapter, None)
        still_used = {key for values in self._values.values() for key in values}
        for key in list(self._params):
            if key not in still_used:
                del self._params[key], self._base[key]

    def set_trainable(self, live: set[str]) -> None:
        for adapter, values in self._values.items():
            for key in values:
                self._params[key].requires_grad_(adapter == self.owner and adapter in live)
