"""Atomic file and folder writes: a temp file in the same folder, fsync, rename. A killed
process leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from deltatune.core.state import atomic_write as write_atomic  # write(temp path), then rename
from deltatune.core.state import default_mode


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(target: str | os.PathLike, text: str) -> None:
    write_atomic(target, lambda p: Path(p).write_text(text, encoding="utf-8"))


def write_json(target: str | os.PathLike, data) -> None:
    write_text(target, json.dumps(data, indent=2, sort_keys=True) + "\n")


def replace_dir(target: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """Build a folder with ``fill(temp_folder)`` and move it to ``target`` in one rename
    (an older ``target`` is replaced)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, default_mode(folder=True))  # mkdtemp makes it owner-only
        fill(tmp)
        for item in tmp.rglob("*"):
            if item.is_file():
                with open(item, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_leftovers(folder: str | os.PathLike) -> None:
    """Delete temp files and folders a killed run left in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for item in folder.iterdir():
        if item.name.startswith(".") and (item.name.endswith(".tmp") or item.name.endswith(".old")):
            shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
