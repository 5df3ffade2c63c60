"""PEFT methods, one sub-package each. Importing this package imports every sub-package, and each
registers its method with :mod:`deltatune.core.registry` on import."""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if _info.ispkg:
        importlib.import_module(f"{__name__}.{_info.name}")
