"""The diff-pruning wrapper for ``nn.Linear`` and GPT-2 ``Conv1D``: ``y = base(x) + x (m * z)``.

Files hold the diff SPARSE: for each layer, the flat positions (``diff_indices``) and values
(``diff_values``) of the nonzero entries of the deterministic diff ``m * z``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.layer import AdapterLayer, adapter_dtype, linear_layout
from deltatune.errors import AdapterFileError
from deltatune.methods.diff_pruning.gates import deterministic_gates, open_probability, sample_gates

#: log-odds given to the gates of a loaded diff: its nonzero entries fully open, the rest shut
LOADED_LOG_ALPHA = 10.0
INDEX_KEY, VALUE_KEY = "diff_indices", "diff_values"


class DiffPruningLinear(AdapterLayer):
    """A gated, dense-while-training diff on the weight of a linear layer (weight in its own layout:
    ``[out, in]`` for ``nn.Linear``, ``[in, out]`` for ``Conv1D``)."""

    adapter_attrs = ("diff_weight", "diff_log_alpha")
    mergeable = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = linear_layout(base_layer)[0]
        self.diff_weight = nn.ParameterDict()
        self.diff_log_alpha = nn.ParameterDict()
        #: merged adapter -> (flat positions it changed, the base weight's values there before)
        self._overwritten: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def add_adapter(self, name: str, init_log_alpha: float) -> None:
        weight = self.base_layer.weight
        kw = {"dtype": adapter_dtype(weight), "device": weight.device}
        self.diff_weight[name] = nn.Parameter(torch.zeros(weight.shape, **kw))
        self.diff_log_alpha[name] = nn.Parameter(torch.full(weight.shape, float(init_log_alpha), **kw))

    # --- gates and the diff ---------------------------------------------------------------
    def gates(self, name: str) -> torch.Tensor:
        """Stochastic gates in training mode, deterministic ones in eval mode."""
        log_alpha = self.diff_log_alpha[name]
        return sample_gates(log_alpha) if self.training else deterministic_gates(log_alpha)

    def delta_weight(self, name: str) -> torch.Tensor:
        """The deterministic diff ``m * z`` (what eval mode adds, what merging and files use)."""
        return self.diff_weight[name] * deterministic_gates(self.diff_log_alpha[name])

    def expected_open(self, name: str) -> torch.Tensor:
        """The expected number of open gates (differentiable)."""
        return open_probability(self.diff_log_alpha[name]).sum()

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        live = self.unmerged_active()
        if not live:
            return result
        diff = sum(self.diff_weight[n] * self.gates(n) for n in live)
        x = x.to(diff.dtype)
        change = x @ diff if self.fan_in_fan_out else F.linear(x, diff)
        return result + change.to(result.dtype)

    # --- merging ------------------------------------------------------------------------
    def _merge_into(self, weight: torch.Tensor, name: str) -> None:
        """Add the diff to the base weight, remembering the entries it changes so that
        :meth:`_unmerge_from` restores them bit for bit (the diff is sparse, so this costs little,
        and subtracting again would leave rounding error behind)."""
        flat = weight.data.view(-1)
        diff = self.delta_weight(name).reshape(-1)
        positions = diff.nonzero().reshape(-1)
        self._overwritten[name] = (positions, flat[positions].clone())
        flat[positions] += diff[positions].to(flat.dtype)

    def _unmerge_from(self, weight: torch.Tensor, name: str) -> None:
        """Put back the base weight's entries that the diff changed (exactly)."""
        positions, original = self._overwritten.pop(name)
        flat = weight.data.view(-1)
        flat[positions.to(flat.device)] = original.to(flat.device)

    # --- sparse file state ----------------------------------------------------------------
    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """The nonzero entries of the deterministic diff: flat positions and values."""
        if name not in self.diff_weight:
            return {}
        flat = self.delta_weight(name).detach().reshape(-1)
        positions = flat.nonzero().reshape(-1)
        index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
        return {INDEX_KEY: positions.to(index_dtype), VALUE_KEY: flat[positions]}

    def load_adapter_state(self, name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Rebuild the dense diff from its nonzero entries; their gates open, all others shut."""
        if set(tensors) != {INDEX_KEY, VALUE_KEY}:
            raise AdapterFileError(f"adapter file does not fit diff-pruning layer {where}: it has {sorted(tensors)}, "
                                   f"expected {[INDEX_KEY, VALUE_KEY]}")
        positions, values = tensors[INDEX_KEY], tensors[VALUE_KEY]
        size = self.diff_weight[name].numel()
        problem = None
        if positions.dim() != 1 or values.dim() != 1 or positions.numel() != values.numel():
            problem = f"{INDEX_KEY} and {VALUE_KEY} must be 1-D of equal length"
        elif positions.is_floating_point() or positions.is_complex() or not values.is_floating_point():
            problem = f"{INDEX_KEY} must hold integers and {VALUE_KEY} floats"
        elif positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= size):
            problem = f"a position lies outside the weight's {size} entries (a different base model?)"
        elif positions.unique().numel() != positions.numel():
            problem = f"{INDEX_KEY} repeats a position"
        if problem:
            raise AdapterFileError(f"adapter file does not fit diff-pruning layer {where}: {problem}")
        positions = positions.long()
        with torch.no_grad():
            weight, log_alpha = self.diff_weight[name], self.diff_log_alpha[name]
            weight.zero_()
            weight.view(-1)[positions] = values.to(weight.dtype)
            log_alpha.fill_(-LOADED_LOG_ALPHA)
            log_alpha.view(-1)[positions] = LOADED_LOG_ALPHA
