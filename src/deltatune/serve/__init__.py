"""Serving: one base model, many adapters, requests for different adapters batched together.

Needs the ``serve`` extra (FastAPI, uvicorn): ``pip install 'deltatune[serve]'``. Start it with
``deltatune serve`` or build the app yourself with :func:`create_app`. Importing this package
does not import FastAPI; the names below load on first use.
"""

from __future__ import annotations

__all__ = ["create_app", "ServeSettings", "Batcher", "RequestError"]

_HOMES = {"create_app": "app", "ServeSettings": "settings", "Batcher": "batcher", "RequestError": "errors"}


def __getattr__(name: str):
    if name in _HOMES:
        import importlib
        return getattr(importlib.import_module(f"deltatune.serve.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'deltatune.serve' has no attribute {name!r}")
