"""Alias lists, alias groups, and registering a family's facts (core/archspec.py)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core import archspec
from deltatune.core.targets import alias_map
from tests.toy_models import TOYS, lora_paths

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ["q", "k", "v", "o", "up", "down", "gate"]


def selected(base, targets) -> set[str]:
    return set(lora_paths(dt.attach(base, dt.LoraConfig(r=2, targets=targets))))


def _linear_ending(model, *ends: str) -> set[str]:
    return {p for p, m in model.named_modules() if isinstance(m, nn.Linear) and p.endswith(ends)}


def test_the_full_alias_list_takes_what_a_model_without_gate_has():
    expected = _linear_ending(TOYS["bert"].base(), "query", "key", "value", "dense")
    expected -= {p for p in expected if p.startswith("bert.pooler")}
    assert selected(TOYS["bert"].base(), ALL) == expected


def test_attention_and_mlp_groups_split_the_llama_projections():
    plain = TOYS["llama"].base()
    assert selected(TOYS["llama"].base(), "attention") == _linear_ending(plain, "q_proj", "k_proj", "v_proj", "o_proj")
    assert selected(TOYS["llama"].base(), "mlp") == _linear_ending(plain, "up_proj", "down_proj", "gate_proj")


def test_an_unknown_name_in_an_alias_list_still_fails_naming_what_the_model_has():
    with pytest.raises(dt.TargetError) as err:
        dt.attach(TOYS["gpt2"].base(), dt.LoraConfig(targets=["q", "gate", "attn_q"]))
    message = str(err.value)
    assert "attn_q" in message and "q -> c_attn" in message and "down -> c_proj" in message


def test_the_report_names_each_modules_aliases():
    from tests.arch_zoo import ZOO
    model = dt.attach(ZOO["phi3"].build(), dt.LoraConfig(r=2, targets=["q", "up", "down"]))
    report = model.report()
    for path in lora_paths(model):
        aliases = {"qkv_proj": "q,k,v", "gate_up_proj": "up,gate", "down_proj": "down"}[path.rsplit(".", 1)[-1]]
        assert re.search(rf"^{re.escape(path)}\s+{re.escape(aliases)}\s+default\*", report, re.MULTILINE), path


class _Cell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wq, self.wv, self.mix = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.mix(self.wq(x) + self.wv(x))


class _CellModel(nn.Module):
    """A model no built-in rule knows: blocks under "cells", projections "wq"/"wv"."""

    def __init__(self) -> None:
        super().__init__()
        self.cells = nn.ModuleList([_Cell(), _Cell()])

    def forward(self, x):
        for cell in self.cells:
            x = cell(x)
        return x


@pytest.fixture
def registered():
    specs, spellings = dict(archspec.SPECS), list(archspec.SPELLINGS)
    yield
    archspec.SPECS.clear()
    archspec.SPECS.update(specs)
    archspec.SPELLINGS[:] = spellings


def test_a_registered_family_resolves_aliases_by_class_name(registered):
    model = _CellModel()
    with pytest.raises(dt.TargetError, match="component aliases on this model: none"):
        dt.attach(model, dt.LoraConfig(targets=["q"]))
    archspec.register_family("_CellModel", {"q": r"wq", "v": r"wv"},
                             block_pattern=r"(?P<stack>cells)\.(?P<index>\d+)\.(?P<rest>.+)")
    assert alias_map(model) == {"q": ["cells.0.wq", "cells.1.wq"], "v": ["cells.0.wv", "cells.1.wv"]}
    adapted = dt.attach(model, dt.LoraConfig(r=2, targets=["q", "v"], layers=[1]))
    assert set(lora_paths(adapted)) == {"cells.1.wq", "cells.1.wv"}
    adapted(torch.randn(2, 4))


def test_a_registered_spelling_applies_to_every_family(registered):
    archspec.register_spelling(r"mix", {"o"})
    archspec.register_family("_CellModel", block_pattern=r"(?P<stack>cells)\.(?P<index>\d+)\.(?P<rest>.+)")
    assert alias_map(_CellModel()) == {"o": ["cells.0.mix", "cells.1.mix"]}


@pytest.mark.parametrize("call", [
    lambda: archspec.register_family("x", {"query": "q"}),
    lambda: archspec.register_spelling("x", {"qq"}),
    lambda: archspec.register_spelling("(", {"q"}),
])
def test_registering_bad_facts_is_refused(call, registered):
    with pytest.raises((ValueError, re.error)):
        call()
