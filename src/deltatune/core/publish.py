"""Publish a folder of several files as one step: build it complete beside the target, then swap.

A process killed at any instant leaves the target folder either as it was or as the new
version, never a mix (new weights with an old config, say). On Linux the swap is one
``renameat2(RENAME_EXCHANGE)``, so the target path never goes missing; elsewhere the old folder
is renamed aside and the new one renamed in. Temp and old folders are named
``.<target>.<random>.publish`` and removed by the next successful publish of the same target.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable

#: the name ending of the temp and old folders a publish uses
LITTER_SUFFIX = ".publish"
_RENAME_EXCHANGE = 2  # linux/fs.h


def process_umask() -> int:
    """This process's umask, read without changing it where Linux shows it (changing it, the
    only portable way, would briefly affect files other threads create)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(folder: bool = False) -> int:
    """The permissions ``open()`` / ``mkdir()`` would give a new file or folder; temp files and
    folders start owner-only, so what is renamed into place gets these first."""
    return (0o777 if folder else 0o666) & ~process_umask()


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file or a folder) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _libc_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):  # glibc before 2.28, or another libc
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _libc_renameat2()
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the entries ``a`` and ``b``; False where the system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel or a file system without it
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def litter(target: Path) -> list[Path]:
    """Temp and old folders that interrupted publishes of ``target`` left beside it."""
    prefix = f".{target.name}."
    if not target.parent.is_dir():
        return []
    return [p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(LITTER_SUFFIX)]


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def publish_folder(target: str | os.PathLike, fill: Callable[[Path], None], *,
                   replace: Iterable[str] | None = None) -> None:
    """Write a new version of folder ``target``: ``fill(temp_folder)`` writes its files, which are
    flushed to disk and then swapped in as one step.

    ``replace=None`` replaces the whole folder. Otherwise only the entries named in ``replace``
    are new; every other entry of the old folder is carried into the new version (hard-linked,
    so nothing big is copied), so files saved beside an adapter (a tokenizer, say) survive.
    """
    target = Path(os.path.realpath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    for old in litter(target):  # only one writer per target: anything here is an earlier crash's
        shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=LITTER_SUFFIX))
    try:
        existed = target.is_dir()
        os.chmod(tmp, os.stat(target).st_mode & 0o7777 if existed else default_mode(folder=True))
        if existed and replace is not None:
            keep = set(replace)
            for entry in os.scandir(target):
                if entry.name in keep or (entry.name.startswith(".") and entry.name.endswith(".tmp")):
                    continue  # the new files, and temp files an older writer left
                if entry.is_symlink():
                    os.symlink(os.readlink(entry.path), tmp / entry.name)
                elif entry.is_dir():
                    shutil.copytree(entry.path, tmp / entry.name, symlinks=True, copy_function=_link_or_copy)
                else:
                    _link_or_copy(entry.path, str(tmp / entry.name))
        fill(tmp)
        for item in [*tmp.rglob("*"), tmp]:
            if item.is_dir() or (item.is_file() and not item.is_symlink()):
                fsync_path(item)
        if existed:
            if not _exchange(tmp, target):
                aside = tmp.with_name(tmp.name[:-len(LITTER_SUFFIX)] + ".old" + LITTER_SUFFIX)
                os.replace(target, aside)
                os.replace(tmp, target)
                tmp = aside
        else:
            os.replace(tmp, target)
        fsync_path(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the new folder after a failure, or the old one after the swap
