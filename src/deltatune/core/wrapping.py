"""Putting adapter wrappers into a model: finding the module at a path, checking that a method may
wrap it, and replacing it with the wrapper (or reusing the one there)."""

from __future__ import annotations

from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.errors import TargetError


def unwrapped_target(module: nn.Module, path: str, wrapper: type, method: str, *, exact: bool = False) -> nn.Module:
    """Check that ``method`` may put a ``wrapper`` at ``path``, where ``module`` is now, and return
    the user's module there: ``module`` itself, or the ``base_layer`` of a ``wrapper`` in place already.

    Raises :class:`TargetError`, naming the path, the wrapper in the way and the fix, when another
    method's wrapper holds the module (two wrappers cannot share one layer) or a layer inside it (a
    wrapper around it would nest adapters, a trainable copy would copy the other adapter). With
    ``exact``, a subclass of ``wrapper`` counts as another method's: for subclasses that keep their
    adapters differently.
    """
    if isinstance(module, AdapterLayer):
        if not (type(module) is wrapper if exact else isinstance(module, wrapper)):
            raise TargetError(f"{path} already carries a {type(module).__name__} adapter; {method} cannot wrap it "
                              f"too: give the two adapters disjoint modules (exclude it from one of the two configs)")
        module = module.base_layer
    inner = next(((p, m) for p, m in module.named_modules() if isinstance(m, AdapterLayer)), None)
    if inner is not None:
        raise TargetError(f"{path} contains {path}.{inner[0]}, which carries a {type(inner[1]).__name__} adapter; "
                          f"{method} cannot wrap a module that holds another adapter: give the two adapters "
                          f"disjoint modules")
    return module


def submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)``, through the module dicts directly: adding an adapter looks
    up each wrapped path twice, and ``get_submodule``'s attribute checks cost a tenth of a load."""
    module = model
    try:
        for name in path.split(".") if path else ():
            module = module._modules[name]
    except (KeyError, AttributeError):
        return model.get_submodule(path)  # raises its own clear error
    if module is None:
        return model.get_submodule(path)
    return module


def wrapped(model: nn.Module, path: str, wrapper: type, method: str, make=None, *,
            exact: bool = False) -> "AdapterLayer":
    """The ``wrapper`` instance at ``path``: the one already there, or a new one around the module
    (``make(module)``, default ``wrapper(module)``) put in its place, after the checks of
    :func:`unwrapped_target`."""
    module = submodule(model, path)
    unwrapped_target(module, path, wrapper, method, exact=exact)
    if isinstance(module, AdapterLayer):  # it passed the check, so it is this method's wrapper
        return module
    global _containers_wrapped
    if next(module.children(), None) is not None:
        _containers_wrapped += 1
    module = (make or wrapper)(module)
    model.set_submodule(path, module)
    return module


_containers_wrapped = 0


def containers_wrapped() -> int:
    """How many wrappers so far went around a module with sub-modules, which hides those from
    targeting (a head kept as a trainable copy, say): a saved walk of a model is stale once this
    count changed (see targets.walk_once)."""
    return _containers_wrapped
