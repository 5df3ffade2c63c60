"""Adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``, as HF PEFT writes them.

A save publishes both files together (a complete new folder swapped in, see
:mod:`deltatune.core.publish`). Reads use safetensors only, refuse damaged or hostile content
(deep JSON, non-float or non-finite tensors) and check every key and shape against the model
before anything is copied.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file, save_file

from deltatune.core import registry
from deltatune.core.json_input import parse_object
from deltatune.core.layer import weights_from_file
from deltatune.core.publish import default_mode, publish_folder
from deltatune.core.shared_params import canonical_name
from deltatune.core.targets import walk_once
from deltatune.errors import AdapterFileError, ConfigError, DeltatuneError

if TYPE_CHECKING:
    from deltatune.core.model import AdaptedModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # PEFT's prefix for keys relative to the base model


def adapter_tensors(model: "AdaptedModel", name: str) -> dict[str, torch.Tensor]:
    """Every tensor of adapter ``name``, keyed as in a PEFT file."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in model.adapter_layers():
        if name in layer.adapter_names:
            out.update({f"{KEY_PREFIX}{path}.{k}": v for k, v in layer.file_state(name).items()})
    if name in model.model_adapters:
        out.update(model.model_adapters[name].file_state())
    out.update({KEY_PREFIX + pname: value for pname, value in model._shared.values(name).items()})
    return out


def atomic_write(target: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)`` on a temp file in ``target``'s folder, fsync it, then rename it
    to ``target``: readers see the old file or the whole new one, never half of it. The file
    gets the usual permissions (not the temp file's owner-only ones)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_mode())  # after the write: some writers replace the file
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_adapter(model: "AdaptedModel", directory: str | os.PathLike, name: str | None) -> None:
    """Write adapter ``name`` to ``directory`` (created if needed)."""
    if name is None:
        raise ConfigError("the model has no adapter to save")
    model._check(name)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise AdapterFileError(f"cannot save the adapter to {directory}: it is a file, not a folder")
    config = model.configs[name]
    data = config.to_dict()
    data.update(registry.for_config(config).method.file_extras(model, name))
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_tensors(model, name).items()}
    text = json.dumps(data, indent=2, sort_keys=True)

    def fill(folder: Path) -> None:
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        (folder / CONFIG_NAME).write_text(text)
        for file in (WEIGHTS_NAME, CONFIG_NAME):
            os.chmod(folder / file, default_mode())  # the safetensors writer makes owner-only files

    # config and weights go in together; other files in the folder (a tokenizer, say) stay
    publish_folder(directory, fill, replace=(WEIGHTS_NAME, CONFIG_NAME))


#: files up to this size are read in one go and parsed from memory, which for adapters of a
#: few hundred kB takes less than half the time of memory-mapping them tensor by tensor
_READ_WHOLE_BYTES = 64 * 2**20


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.stat().st_size <= _READ_WHOLE_BYTES:
        return load_safetensors_bytes(path.read_bytes())
    return load_file(str(path))


def read_adapter(directory: str | os.PathLike, *,
                 allow_nonfinite: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config dict, tensors)`` of an adapter folder, with clear errors for bad folders
    (see :func:`check_tensors` for the weights refused)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"adapter folder {directory} does not exist")
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file():
        raise AdapterFileError(f"{directory} has no {CONFIG_NAME}: is it an adapter folder? "
                               f"(it holds: {', '.join(sorted(p.name for p in directory.iterdir())) or 'nothing'})")
    if not weights_path.is_file():
        pickled = [p.name for p in directory.glob("adapter_model.bin")]
        hint = (" It has a pickled adapter_model.bin, which deltatune never loads (unsafe): convert it to "
                "safetensors with the library that wrote it." if pickled else "")
        raise AdapterFileError(f"{directory} has no {WEIGHTS_NAME}.{hint}")
    data = read_config(config_path)
    try:
        tensors = _read_tensors(weights_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _unreadable(weights_path, exc) from None
    check_tensors(tensors, weights_path, allow_nonfinite=allow_nonfinite)
    return data, tensors


def _unreadable(weights: Path, exc: Exception) -> AdapterFileError:
    return AdapterFileError(f"{weights} is not a readable safetensors file ({str(exc)[:200]}); it may be "
                            f"truncated or of another format: save the adapter again")


#: adapter_config.json is a few kB; a bigger one is not an adapter config
_MAX_CONFIG_BYTES = 4 * 2**20


def read_config(path: Path) -> dict:
    """The JSON object in adapter config ``path``; :class:`AdapterFileError` for a damaged,
    oversized or deeply nested file."""
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise AdapterFileError(f"{path} has {path.stat().st_size} bytes, more than an adapter config "
                               f"({_MAX_CONFIG_BYTES} at most): it is not an adapter_config.json")
    return parse_object(path.read_bytes(), str(path), AdapterFileError)


def check_tensors(tensors: dict[str, torch.Tensor], where: Path, *, allow_nonfinite: bool = False) -> None:
    """Refuse, unless ``allow_nonfinite``, floating tensors with NaN or Inf values, naming the first
    bad one: loaded, they would make every output NaN. (Integer tensors where the model has
    floating ones are refused by the layer that receives them.)"""
    if allow_nonfinite or _all_finite([v for v in tensors.values() if v.dtype.is_floating_point and v.numel()]):
        return
    for key in sorted(tensors):
        value = tensors[key]
        if not value.dtype.is_floating_point:
            continue
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise AdapterFileError(f"{where}: tensor {key} holds {bad} NaN or infinite values (training diverged, "
                                   f"or the file is damaged); retrain, or pass allow_nonfinite=True to load it anyway")


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether no tensor holds a NaN or an infinity: one largest-magnitude reduction over all of
    them (NaN and inf propagate into it) instead of a check per tensor, which dominated the check."""
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    return all(bool(torch.stack(torch._foreach_norm(group, ord=math.inf)).isfinite().all())
               for group in by_kind.values())


#: classification-head weights as adapter files name them (BERT-style, Llama-style, RoBERTa-style)
_HEAD_WEIGHTS = ("classifier.weight", "score.weight", "classifier.out_proj.weight")


def tensor_shapes(weights: Path) -> dict[str, list[int]]:
    """Each tensor's shape in safetensors file ``weights``, read from its header only;
    :class:`AdapterFileError` when the file cannot be read."""
    try:
        with safe_open(str(weights), framework="pt") as fh:
            return {key: list(fh.get_slice(key).get_shape()) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _unreadable(weights, exc) from None


def saved_class_count(directory: str | os.PathLike) -> int | None:
    """The class count of a classification adapter, from its saved head's shape (the file's
    header only; no weights are read); None when it has no head or no weights file.
    Raises :class:`AdapterFileError` when the weights file cannot be read."""
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        return None
    for key, shape in tensor_shapes(weights).items():
        if key.endswith(_HEAD_WEIGHTS):
            return shape[0] if shape else None
    return None


def split_by_layer(model: "AdaptedModel", name: str, tensors: dict[str, torch.Tensor]):
    """Group a file's tensors by the adapter layer of ``name`` they belong to; also returns the
    trained base parameters (bias option) and model-level tensors. Unplaceable keys raise."""
    layers = dict(model.adapter_layers())
    extras = {canonical_name(n) for n in model._shared.names(name)}
    per_layer: dict[str, dict[str, torch.Tensor]] = {p: {} for p, layer in layers.items() if name in layer.adapter_names}
    extra_values: dict[str, torch.Tensor] = {}
    model_level: dict[str, torch.Tensor] = {}
    stray: list[str] = []
    for key, value in tensors.items():
        if not key.startswith(KEY_PREFIX):
            if name in model.model_adapters:
                model_level[key] = value
            else:
                stray.append(key)
            continue
        rel = key[len(KEY_PREFIX):]
        if canonical_name(rel) in extras:
            extra_values[rel] = value
            continue
        parts = rel.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            path = ".".join(parts[:cut])
            if path in per_layer:
                per_layer[path][".".join(parts[cut:])] = value
                break
        else:
            stray.append(key)
    if stray:
        raise AdapterFileError(f"the adapter file has {len(stray)} tensors that fit no adapted layer of this "
                               f"model, e.g. {stray[:3]}: it was made for another base model or config")
    return per_layer, extra_values, model_level


@contextlib.contextmanager
def _as_adapter_file_errors(directory: str | os.PathLike):
    """Last line of defence for hostile configs: an error that is not a deltatune one (a value no
    check foresaw reaching torch or a method) still becomes a clear :class:`AdapterFileError`."""
    try:
        yield
    except DeltatuneError:
        raise
    except (ArithmeticError, AttributeError, LookupError, MemoryError, RecursionError, RuntimeError, TypeError,
            ValueError) as exc:
        raise AdapterFileError(f"{directory}: {CONFIG_NAME} describes an adapter that cannot be built "
                               f"({type(exc).__name__}: {str(exc)[:200]}); the file is damaged or hostile") from None


def load_adapter(model: "AdaptedModel", directory: str | os.PathLike, name: str, *, trainable: bool = False,
                 allow_nonfinite: bool = False, read: Callable[..., tuple[dict, dict]] = read_adapter) -> None:
    """Add the adapter stored in ``directory`` to ``model`` as ``name``; ``read(directory,
    allow_nonfinite=...)`` turns the folder into ``(PEFT config dict, tensors keyed as in a PEFT file)``.

    On any mismatch the half-added adapter is removed again and the model is left as it was.
    """
    data, tensors = read(directory, allow_nonfinite=allow_nonfinite)
    with _as_adapter_file_errors(directory):
        spec = registry.for_file(data)
        config = spec.config_cls.from_dict(data)
        with weights_from_file(), walk_once():
            model.add(config, name, trainable=trainable)
    try:
        copy_adapter_weights(model, name, tensors)
    except Exception:
        active = [n for n in model.active_adapters if n != name]
        model._drop(name)
        if model.adapter_names:
            model.use(active or model.adapter_names[:1])
        raise


def copy_adapter_weights(model: "AdaptedModel", name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a file's ``tensors`` into the existing adapter ``name`` in place (the parameters stay
    the same objects, so an optimizer holding them keeps working)."""
    per_layer, extra_values, model_level = split_by_layer(model, name, tensors)
    layers = dict(model.adapter_layers())
    for path, layer_tensors in per_layer.items():
        layers[path].load_adapter_state(name, layer_tensors, where=path)
    if name in model.model_adapters:
        model.model_adapters[name].load_file_state(model_level)
    found = {canonical_name(n) for n in extra_values}
    missing = sorted(n for n in model._shared.names(name) if canonical_name(n) not in found)
    if missing:
        raise AdapterFileError(f"the adapter file lacks the trained biases {missing[:3]}")
    model._shared.set_values(name, extra_values)
