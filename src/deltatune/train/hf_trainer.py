"""``transformers.Trainer`` (and TRL's trainers) with deltatune models: adapter folders as checkpoints.

A plain ``Trainer`` trains a deltatune model, but saves what it cannot recognise as a full
``model.safetensors`` of the wrapper. :class:`AdapterTrainer`, or any trainer class passed
through :func:`adapter_trainer` (``adapter_trainer(trl.SFTTrainer)``), writes the active adapter
as an adapter folder instead (``save_model()`` and every ``checkpoint-*``), which deltatune and
HF ``peft`` both load, and resumes from such a folder in place.
"""

from __future__ import annotations

import functools
import inspect
import os

from transformers import Trainer
from transformers.utils import can_return_loss, find_labels

from deltatune.core.model import AdaptedModel
from deltatune.core.state import copy_adapter_weights, read_adapter
from deltatune.errors import AdapterError


def _adapted(model) -> AdaptedModel | None:
    """The :class:`AdaptedModel` inside ``model`` (unwrapping DDP / compile), or None."""
    for _ in range(4):
        if isinstance(model, AdaptedModel):
            return model
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
    return None


class AdapterTrainerMixin:
    """Put in front of a ``transformers.Trainer`` subclass: saves and resumes adapter folders
    when the model is a deltatune model, and behaves as the plain trainer otherwise."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        adapted = _adapted(self.model)
        if adapted is not None:
            # Trainer reads these from the model class; the wrapper's class shows neither
            base_class = type(adapted.base_model)
            if self.args.label_names is None:
                self.label_names = find_labels(base_class)
            self.can_return_loss = can_return_loss(base_class)
            _move_forward_patch_to_base(adapted)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        adapted = _adapted(self.model)
        if adapted is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        adapted.save(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        adapted = _adapted(model if model is not None else self.model)
        if adapted is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        _restore_active_adapter(adapted, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        adapted = _adapted(self.model)
        if adapted is None:
            return super()._load_best_model()
        _restore_active_adapter(adapted, self.state.best_model_checkpoint)
        return None


def _move_forward_patch_to_base(model: AdaptedModel) -> None:
    """TRL's SFTTrainer replaces the model's ``forward`` with one that runs ``model.base_model``
    as the backbone and applies the LM head itself (its fused LM head). On the wrapper that
    name means the whole causal LM, so the patch is moved to the transformers model: the
    wrapper's forward then reaches it with the adapters active."""
    patched = model.__dict__.get("forward")
    if patched is None:
        return
    func = getattr(patched, "__func__", None)
    code = getattr(func, "__code__", None)  # the wrapper's own name: functools.wraps renames the patch
    if code is None or code.co_name != "_fused_forward":
        raise AdapterError(f"the trainer replaced the model's forward with {patched!r}, which deltatune "
                           f"models cannot take; please report it with the trainer's name")
    from trl.trainer.utils import add_fused_lm_head

    options = inspect.getclosurevars(func).nonlocals
    del model.__dict__["forward"]
    add_fused_lm_head(model.base_model, temperature=options.get("temperature", 1.0),
                      cast_lm_head_to_fp32=options.get("cast_lm_head_to_fp32", False),
                      outputs=options.get("outputs", ("log_probs",)))


def _restore_active_adapter(model: AdaptedModel, directory: str) -> None:
    name = model.active_adapter
    if name is None:
        raise AdapterError("the model has no active adapter to restore from a checkpoint")
    _, tensors = read_adapter(directory)
    copy_adapter_weights(model, name, tensors)


@functools.lru_cache(maxsize=None)
def adapter_trainer(trainer_class: type) -> type:
    """``trainer_class`` (``transformers.Trainer`` or a subclass such as ``trl.SFTTrainer``)
    with :class:`AdapterTrainerMixin` in front: adapter folders as checkpoints."""
    if issubclass(trainer_class, AdapterTrainerMixin):
        return trainer_class
    return type(f"Adapter{trainer_class.__name__}", (AdapterTrainerMixin, trainer_class),
                {"__module__": __name__, "__doc__": adapter_trainer.__doc__})


AdapterTrainer = adapter_trainer(Trainer)
