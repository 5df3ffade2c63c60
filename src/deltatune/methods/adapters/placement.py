"""Where a bottleneck adapter goes in each architecture, and how it reads and writes there.

Three placements, chosen per wrapped module:

``sequential``
    (Houlsby, Pfeiffer) the adapter reads the module's output ``y`` and adds to it:
    ``y + s * f(y)``. The module is a linear layer (the attention or FFN output projection).
``parallel``
    the adapter reads the module's input ``x``: ``module(x) + s * f(x)``. The module is the FFN
    block (GPT-2 ``mlp``, LLaMA ``mlp``, T5 ``DenseReluDense``).
``residual``
    BERT-style ``*Output`` modules compute ``LayerNorm(dropout(dense(h)) + input_tensor)``, where
    ``input_tensor`` is the FFN block's input. BERT has no module holding the whole FFN, so the
    parallel adapter wraps ``output`` and adds ``s * f(input_tensor)`` to ``input_tensor``:
    ``LayerNorm(dense(h) + x + s * f(x))``, which is exactly "add the adapter of the FFN input
    to the FFN output before the residual LayerNorm".
"""

from __future__ import annotations

import inspect
import re

from torch import nn

from deltatune.core.archspec import spec_for
from deltatune.core.layer import linear_kinds, linear_layout
from deltatune.core.targets import resolve_targets, visible_modules
from deltatune.errors import TargetError

SEQUENTIAL, PARALLEL, RESIDUAL = "sequential", "parallel", "residual"

#: component aliases (core/archspec.py) each sequential style follows
STYLE_COMPONENTS = {"houlsby": ("o", "down"), "pfeiffer": ("down",)}

# The FFN block per architecture, as a path inside a transformer block. The archspec has no
# alias for it yet (the proposal is an "ffn" component there); until then it lives here.
_BERT_FFN = r"output"  # BertOutput: takes (hidden_states, input_tensor=FFN input)
FFN_BLOCKS = {
    "bert": _BERT_FFN, "roberta": _BERT_FFN, "xlm-roberta": _BERT_FFN, "electra": _BERT_FFN,
    "gpt2": r"mlp", "llama": r"mlp", "mistral": r"mlp", "qwen2": r"mlp",
    "t5": r"layer\.\d+\.DenseReluDense",
}
_GENERIC_FFN = r"mlp|feed_forward|ffn|layer\.\d+\.DenseReluDense"


def _ffn_paths(model: nn.Module) -> list[str]:
    spec = spec_for(model)
    pattern = re.compile(FFN_BLOCKS.get(spec.name, _GENERIC_FFN))
    paths = [p for p in visible_modules(model) if (s := spec.split(p)) and pattern.fullmatch(s[2])]
    if not paths:
        raise TargetError(f"no FFN block found in {type(model).__name__} for a parallel adapter; "
                          f"name the modules to run beside with targets=[...]")
    return paths


def adapter_paths(model: nn.Module, config) -> list[str]:
    """Paths of the modules a bottleneck config wraps, in model order."""
    sequential = config.style != "parallel"
    kinds = linear_kinds() if sequential else (nn.Module,)
    if config.targets is not None:
        targets = config.targets
    elif sequential:
        targets = list(STYLE_COMPONENTS[config.style])
    else:
        targets = _ffn_paths(model)
    return resolve_targets(model, targets, kinds=kinds, layers=config.layers, exclude=config.exclude)


def placement_of(module: nn.Module, style: str) -> str:
    """How the adapter connects to ``module`` (see the module docstring)."""
    if style != "parallel":
        return SEQUENTIAL
    takes_residual = "input_tensor" in inspect.signature(module.forward).parameters
    return RESIDUAL if takes_residual else PARALLEL


def adapter_dims(module: nn.Module, placement: str, path: str) -> tuple[int, int]:
    """``(in_features, out_features)`` of the adapter that sits at ``module``."""
    if isinstance(module, linear_kinds()):
        inner = [module]
    else:
        inner = [m for m in module.modules() if isinstance(m, linear_kinds())]
    if not inner:
        raise TargetError(f"{path} is a {type(module).__name__} with no linear layer inside, so its width "
                          f"is unknown; target a linear layer or an FFN block")
    hidden_in = linear_layout(inner[0])[1]
    hidden_out = linear_layout(inner[-1])[2]
    if placement == PARALLEL:
        return hidden_in, hidden_out
    return hidden_out, hidden_out  # reads what it writes: the module's output, or the residual stream
