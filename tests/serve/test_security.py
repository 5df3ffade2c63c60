"""Admin token checks and adapter path resolution, on their own (the HTTP side is in test_app)."""

from __future__ import annotations

import os
import shutil

import pytest

from deltatune.serve.errors import RequestError
from deltatune.serve.security import check_admin_token, resolve_adapter_path


@pytest.fixture
def root(tmp_path):
    """An adapter root holding ``good/`` and ``nested/deep/``, next to an ``outside/`` adapter."""
    inside = tmp_path / "root"
    for folder in (inside / "good", inside / "nested" / "deep", tmp_path / "outside"):
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        (folder / "adapter_model.safetensors").write_bytes(b"")
    return inside


def refused(root, path) -> RequestError:
    with pytest.raises(RequestError) as info:
        resolve_adapter_path(root, path)
    assert 400 <= info.value.status < 500
    return info.value


def test_plain_folders_inside_the_root_resolve(root):
    assert resolve_adapter_path(root, "good") == (root / "good").resolve()
    assert resolve_adapter_path(root, "nested/deep") == (root / "nested" / "deep").resolve()
    assert resolve_adapter_path(root, "./good/") == (root / "good").resolve()


@pytest.mark.parametrize("path", ["../outside", "good/../../outside", "..", "nested/../good"])
def test_dot_dot_is_refused_even_when_it_would_stay_inside(root, path):
    assert "'..'" in refused(root, path).detail


def test_absolute_paths_are_refused(root):
    for path in [str(root / "good"), "/etc", "C:\\adapters\\x", "C:/adapters/x"]:
        err = refused(root, path)
        assert "absolute" in err.detail or "'/'" in err.detail


def test_symlinks_are_refused_wherever_they_are(root, tmp_path):
    os.symlink(tmp_path / "outside", root / "link_out")  # points outside
    os.symlink(root / "good", root / "link_in")  # points inside: still not followed
    os.symlink(tmp_path / "outside", root / "nested" / "deep_link")
    for path in ["link_out", "link_in", "nested/deep_link"]:
        assert "symlink" in refused(root, path).detail
    # a real folder whose weights file is a link to a file outside
    shutil.copytree(root / "good", root / "sneaky")
    (root / "sneaky" / "adapter_model.safetensors").unlink()
    os.symlink(tmp_path / "outside" / "adapter_model.safetensors", root / "sneaky" / "adapter_model.safetensors")
    assert "symlink" in refused(root, "sneaky").detail


def test_missing_folders_empty_paths_and_no_root(root):
    assert refused(root, "nope").status == 404
    assert refused(root, "good/adapter_config.json").status == 404  # a file, not a folder
    assert refused(root, "").status == 400
    assert refused(root, "go\x00od").status == 400
    with pytest.raises(RequestError) as info:
        resolve_adapter_path(None, "good")
    assert info.value.status == 403 and "--adapter-root" in info.value.detail


def test_admin_token():
    check_admin_token("s3cret", "s3cret")
    for given in [None, "", "s3cre", "s3cret ", "S3CRET"]:
        with pytest.raises(RequestError) as info:
            check_admin_token(given, "s3cret")
        assert info.value.status == 401
    with pytest.raises(RequestError) as info:
        check_admin_token("anything", None)
    assert info.value.status == 403 and "DELTATUNE_ADMIN_TOKEN" in info.value.detail
