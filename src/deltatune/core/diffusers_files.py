"""LoRA files in diffusers' layout, both ways.

diffusers keeps an adapter in one ``pytorch_lora_weights.safetensors``: keys are module paths
with PEFT's ``lora_A`` / ``lora_B`` factors, prefixed by the pipeline component they belong to
(``unet.`` or ``transformer.``; none when a model saved itself), and the adapter's PEFT
``LoraConfig`` rides in the header's ``lora_adapter_metadata`` (keys prefixed the same way).
Such a file loads with ``model.load_lora_adapter(folder, prefix=...)`` and with a pipeline's
``load_lora_weights(folder)``.

Reading accepts that layout with or without metadata (without it, each layer's rank comes from
its factors and alpha equals the rank, as diffusers assumes). Kohya / A1111 files
(``lora_unet_...lora_down.weight``) and diffusers' pre-PEFT layout (``...to_q_lora.down.weight``)
are refused with the way to convert them.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from deltatune.core.archspec_diffusers import diffusers_family
from deltatune.core.json_input import parse_object
from deltatune.core.state import KEY_PREFIX, adapter_tensors, atomic_write, check_tensors, read_adapter, save_adapter
from deltatune.errors import AdapterError, AdapterFileError, ConfigError

if TYPE_CHECKING:
    from deltatune.core.model import AdaptedModel

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
#: pipeline component each model family sits under, as diffusers' pipeline loaders expect it
COMPONENT_PREFIX = {"diffusers-unet": "unet", "diffusers-dit": "transformer"}
_DENOISER_PREFIXES = ("unet", "transformer")
_TEXT_PREFIXES = ("text_encoder", "text_encoder_2", "text_encoder_3")
_FACTORS = ("lora_A.weight", "lora_B.weight")


def save_diffusers_adapter(model: "AdaptedModel", directory: str | os.PathLike, name: str) -> None:
    """Write LoRA adapter ``name`` of a diffusers model as ``directory/pytorch_lora_weights.safetensors``."""
    family = diffusers_family(model.base_model)
    if family is None:
        raise AdapterError(f"format='diffusers' is for diffusers models (UNet2DConditionModel, SD3/Flux "
                           f"transformers); this is a {type(model.base_model).__name__}: save with format='peft'")
    model._check(name)
    config = model.configs[name].to_dict()
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"diffusers files hold LoRA adapters; {name!r} is a {type(model.configs[name]).__name__}")
    tensors = adapter_tensors(model, name)
    other = sorted(k for k in tensors if not k.endswith(_FACTORS))
    if other or config.get("modules_to_save"):
        raise AdapterError(f"adapter {name!r} has tensors diffusers' loader does not read (e.g. "
                           f"{(other or config['modules_to_save'])[:2]}): save it with format='peft'")
    prefix = COMPONENT_PREFIX[family]
    weights = {f"{prefix}.{k[len(KEY_PREFIX):]}": v.detach().to("cpu").contiguous().clone()
               for k, v in tensors.items()}
    metadata = {f"{prefix}.{k}": v for k, v in config.items()}
    header = {"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)}
    atomic_write(Path(directory) / WEIGHTS_NAME, lambda p: save_file(weights, p, metadata=header))


def writer_for(format: str):
    """The function that saves an adapter in ``format``: ``"peft"`` (adapter_config.json +
    adapter_model.safetensors) or ``"diffusers"`` (pytorch_lora_weights.safetensors)."""
    writers = {"peft": save_adapter, "diffusers": save_diffusers_adapter}
    if format not in writers:
        raise ConfigError(f"format must be 'peft' or 'diffusers', got {format!r}")
    return writers[format]


def is_diffusers_folder(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a diffusers LoRA file and no PEFT adapter_config.json."""
    directory = Path(directory)
    return (directory / WEIGHTS_NAME).is_file() and not (directory / "adapter_config.json").is_file()


def reader_for(directory: str | os.PathLike):
    """The function that reads ``directory`` as ``(config dict, tensors)``: diffusers' layout or PEFT's."""
    return read_diffusers_folder if is_diffusers_folder(directory) else read_adapter


def read_diffusers_folder(directory: str | os.PathLike, *,
                          allow_nonfinite: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(PEFT config dict, tensors keyed as in a PEFT file)`` of a diffusers LoRA folder, with the
    same weight checks as a PEFT folder (:func:`~deltatune.core.state.check_tensors`)."""
    path = Path(directory) / WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{path} is not a readable safetensors file ({str(exc)[:200]}); it may be "
                               f"truncated") from None
    check_tensors(tensors, path, allow_nonfinite=allow_nonfinite)
    _refuse_other_layouts(path, tensors)
    prefix = _denoiser_prefix(path, tensors)
    if prefix:
        tensors = _under(prefix, tensors)
    stray = sorted(k for k in tensors if not k.endswith(_FACTORS))
    if stray:
        raise AdapterFileError(f"{path} has tensors that are not LoRA factors, e.g. {stray[:3]}; deltatune reads "
                               f"LoRA files (lora_A / lora_B) only")
    config = _config_from_metadata(path, header, prefix) or _config_from_factors(tensors)
    return config, {KEY_PREFIX + k: v for k, v in tensors.items()}


def _under(prefix: str, entries: dict) -> dict:
    """The entries whose key starts with ``prefix.``, with that removed."""
    return {k[len(prefix) + 1:]: v for k, v in entries.items() if k.startswith(prefix + ".")}


def _refuse_other_layouts(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    keys = list(tensors)
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k for k in keys):
        raise AdapterFileError(
            f"{path} is a kohya / A1111 LoRA (keys like {keys[0]!r}), which deltatune does not read: convert it "
            f"with diffusers (pipe.load_lora_weights(file, adapter_name='x'), then "
            f"pipe.unet.save_lora_adapter(folder, adapter_name='x')) and load that folder")
    if any(".lora.down." in k or "_lora.down." in k for k in keys):
        raise AdapterFileError(
            f"{path} uses diffusers' old attention-processor layout ({keys[0]!r}): convert it with diffusers "
            f"(pipe.load_lora_weights(file, adapter_name='x'), then pipe.unet.save_lora_adapter(folder, "
            f"adapter_name='x')) and load that folder")


def _denoiser_prefix(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """The pipeline component prefix of the denoiser's keys ("" when keys have none); keys of
    text encoders are left out with a warning."""
    heads = Counter(k.split(".", 1)[0] for k in tensors)
    denoisers = [h for h in heads if h in _DENOISER_PREFIXES]
    if not denoisers and not any(h in _TEXT_PREFIXES for h in heads):
        return ""
    if len(denoisers) != 1 or set(heads) - set(_DENOISER_PREFIXES) - set(_TEXT_PREFIXES):
        raise AdapterFileError(f"{path} mixes key prefixes {sorted(heads)}; expected one of "
                               f"{_DENOISER_PREFIXES} (and optionally text encoders)")
    skipped = sorted(h for h in heads if h in _TEXT_PREFIXES)
    if skipped:
        warnings.warn(f"{path}: the LoRA layers of {', '.join(skipped)} are not loaded (dt.load adapts one "
                      f"model, the {denoisers[0]}); load them into the text encoder with diffusers", stacklevel=4)
    return denoisers[0]


def _config_from_metadata(path: Path, header: dict, prefix: str) -> dict | None:
    text = header.get(METADATA_KEY)
    if not text:
        return None
    data = parse_object(text, f"{path}: its {METADATA_KEY} header", AdapterFileError)
    if prefix and any(k.startswith(prefix + ".") for k in data):
        data = _under(prefix, data)
    return {"peft_type": "LORA", **data}


def _config_from_factors(tensors: dict[str, torch.Tensor]) -> dict:
    """A PEFT LoRA config for a file without metadata: ranks from lora_B's shape, alpha = rank."""
    ranks = {k[: -len(".lora_B.weight")]: int(v.shape[1]) for k, v in tensors.items() if k.endswith("lora_B.weight")}
    if not ranks:
        raise AdapterFileError("the diffusers LoRA file holds no lora_B factors")
    common = Counter(ranks.values()).most_common(1)[0][0]
    odd = {p.replace(".", r"\."): r for p, r in ranks.items() if r != common}
    return {"peft_type": "LORA", "r": common, "lora_alpha": common, "target_modules": sorted(ranks),
            "rank_pattern": odd, "alpha_pattern": dict(odd), "modules_to_save": []}
