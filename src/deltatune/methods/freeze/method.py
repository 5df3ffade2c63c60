"""How freezing attaches: a trainable copy (the core's ``ModulesToSave``) of every chosen module."""

from __future__ import annotations

import copy

from torch import nn

from deltatune.core.layer import ModulesToSave
from deltatune.core.wrapping import unwrapped_target, wrapped
from deltatune.core.registry import Method
from deltatune.methods.freeze.config import FreezeConfig
from deltatune.methods.freeze.select import train_paths


class TiedModulesToSave(ModulesToSave):
    """A ``ModulesToSave`` whose copies can share one ``deepcopy`` memo, so that weights tied in the
    base model (GPT-2's ``lm_head`` and ``wte``; T5's ``shared``, ``embed_tokens`` and ``lm_head``)
    stay tied across the copies of one adapter, and train as one parameter. The frozen originals
    are kept for ``disabled()`` but do not count as the model's parameters: the copies replace them."""

    original_counted = False

    def add_adapter(self, name: str, memo: dict | None = None) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.base_layer, memo)
        for p in self.modules_to_save[name].parameters():
            p.requires_grad_(True)


class FreezeMethod(Method):
    """Registered for ``freeze``, ``head-only`` and ``full``."""

    def inject(self, model: nn.Module, config: FreezeConfig, name: str) -> list[str]:
        paths = train_paths(model, config.train)
        for path in paths:  # check all before wrapping any
            unwrapped_target(model.get_submodule(path), path, ModulesToSave, config.method)
        memo: dict = {}
        for path in paths:
            module = wrapped(model, path, ModulesToSave, config.method, make=TiedModulesToSave)
            if name in module.adapter_names:  # e.g. the classification head, a module to save already
                continue
            if isinstance(module, TiedModulesToSave):
                module.add_adapter(name, memo)
            else:
                module.add_adapter(name)
        return paths
