"""Admin token checks and adapter path resolution.

Runtime adapter loading takes a path from the network, so it may name only a folder inside the
adapter root: no absolute paths, no ``..``, and no symlink anywhere on the way or among the
adapter's files (a link inside the root could point anywhere).
"""

from __future__ import annotations

import secrets
from pathlib import Path, PurePosixPath, PureWindowsPath

from deltatune.core.state import CONFIG_NAME, WEIGHTS_NAME
from deltatune.serve.errors import RequestError

#: the files a deltatune / HF PEFT adapter folder is read from (safetensors only)
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)

#: the environment variable that holds the admin token
TOKEN_ENV = "DELTATUNE_ADMIN_TOKEN"


def check_admin_token(given: str | None, expected: str | None) -> None:
    """Raise a 401 unless ``given`` equals ``expected`` (compared in constant time), or a 403
    when no admin token is configured at all."""
    if not expected:
        raise RequestError(403, f"admin endpoints are disabled: start the server with {TOKEN_ENV} set")
    if given is None or not secrets.compare_digest(given.encode(), expected.encode()):
        raise RequestError(401, f"missing or wrong admin token: send 'Authorization: Bearer <{TOKEN_ENV}>'")


def resolve_adapter_path(root: str | Path | None, relative: str) -> Path:
    """The real path of adapter folder ``relative`` inside ``root``; raises a 4xx
    :class:`RequestError` for anything that is not a plain folder below the root."""
    try:
        return _resolve(root, relative)
    except OSError as exc:  # a name too long for the file system, a loop of links ...
        raise RequestError(400, f"path cannot be used as a folder name ({exc.strerror or exc}); "
                                f"give a shorter path relative to the adapter root") from None


def _resolve(root: str | Path | None, relative: str) -> Path:
    if root is None:
        raise RequestError(403, "runtime adapter loading is disabled: start the server with --adapter-root DIR")
    if not relative or "\x00" in relative or "\\" in relative:
        raise RequestError(400, "path must be a non-empty folder path relative to the adapter root, using '/'")
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).drive:
        raise RequestError(400, f"path {relative!r} is absolute; give a path relative to the adapter root")
    parts = PurePosixPath(relative).parts
    if ".." in parts:
        raise RequestError(400, f"path {relative!r} contains '..'; it must stay inside the adapter root")
    base = Path(root).resolve()
    current = base
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise RequestError(403, f"path {relative!r} goes through a symlink; symlinks are not followed")
    if not current.resolve().is_relative_to(base):  # belt and braces: nothing above may escape
        raise RequestError(403, f"path {relative!r} resolves outside the adapter root")
    if not current.is_dir():
        raise RequestError(404, f"no adapter folder at {relative!r} in the adapter root")
    for name in ADAPTER_FILES:
        if (current / name).is_symlink():
            raise RequestError(403, f"{relative}/{name} is a symlink; symlinks are not followed")
    return current
