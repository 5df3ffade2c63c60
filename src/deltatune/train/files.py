"""Atomic file and folder writes: a temp file in the same folder, fsync, rename (folders: see
:mod:`deltatune.core.publish`). A killed process leaves either the old file or the new one,
never half of one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from deltatune.core.publish import LITTER_SUFFIX, publish_folder
from deltatune.core.state import atomic_write as write_atomic  # write(temp path), then rename


def write_text(target: str | os.PathLike, text: str) -> None:
    write_atomic(target, lambda p: Path(p).write_text(text, encoding="utf-8"))


def write_json(target: str | os.PathLike, data) -> None:
    write_text(target, json.dumps(data, indent=2, sort_keys=True) + "\n")


def replace_dir(target: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """Build a folder with ``fill(temp_folder)`` and swap it in for ``target`` in one step
    (an older ``target`` is replaced as a whole)."""
    publish_folder(target, fill)


def remove_leftovers(folder: str | os.PathLike) -> None:
    """Delete temp files and folders a killed run left in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for item in folder.iterdir():
        if item.name.startswith(".") and item.name.endswith((".tmp", ".old", LITTER_SUFFIX)):
            shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
