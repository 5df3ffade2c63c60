"""The validation rules the method configs share (deltatune.core.config): every refusal is a
ConfigError that names the field, the bad value and what is allowed, written out here in full."""

from __future__ import annotations

import pytest

import deltatune as dt

REFUSED = [
    (dt.LoraConfig, {"r": 0}, "r must be a positive integer (the rank of the update), got 0"),
    (dt.LoraConfig, {"alpha": True}, "alpha must be a positive number, got True"),
    (dt.LoraConfig, {"rank_pattern": {"query": 1.5}}, "rank_pattern['query'] must be a positive integer, got 1.5"),
    (dt.LoraConfig, {"alpha_pattern": {"value": 0}}, "alpha_pattern['value'] must be a positive number, got 0"),
    (dt.LoraConfig, {"bias": "some"}, "bias must be one of ('none', 'all', 'lora_only'), got 'some'"),
    (dt.LoraConfig, {"modules_to_save": "classifier"},
     "modules_to_save must be a list of module names, got 'classifier'"),
    (dt.AdapterConfig, {"bottleneck": 0},
     "bottleneck must be a positive integer, or None (then hidden // reduction_factor), got 0"),
    (dt.AdapterConfig, {"reduction_factor": -2},
     "reduction_factor must be a positive number (hidden size / bottleneck width), got -2"),
    (dt.AdapterConfig, {"style": "serial"}, "style must be one of ('houlsby', 'pfeiffer', 'parallel'), got 'serial'"),
    (dt.CompacterConfig, {"phm_rank": True},
     "phm_rank must be a positive integer, or None (full-rank fast weights), got True"),
    (dt.PromptTuningConfig, {"num_virtual_tokens": 0},
     "num_virtual_tokens must be a positive integer (e.g. 20), got 0"),
    (dt.PromptTuningConfig, {"num_layers": 2.0},
     "num_layers must be a positive integer, or None (read from the model), got 2.0"),
    (dt.PrefixTuningConfig, {"encoder_hidden_size": 0},
     "encoder_hidden_size must be a positive integer, or None (= token_dim), got 0"),
    (dt.PTuningConfig, {"encoder_dropout": 1}, "encoder_dropout must be in [0, 1), got 1"),
    (dt.DiffPruningConfig, {"target_sparsity": 1.0},
     "target_sparsity must be in [0, 1) (e.g. 0.995 keeps 0.5% of the diff), got 1.0"),
    (dt.IA3Config, {"targets": 3}, "targets must be a regex string or a non-empty list of module names, got 3"),
    (dt.IA3Config, {"exclude": ["", "q"]}, "exclude must be a regex string or a list of module names, got ('', 'q')"),
    (dt.BitFitConfig, {"targets": ["q", ""]},
     "targets must be 'all', a regex string or a non-empty list of module names, got ('q', '')"),
    (dt.DiffPruningConfig, {"targets": []},
     "targets must be 'all-linear', a regex string or a non-empty list of module names, got ()"),
]
# refused at attach time before, with a TypeError or ValueError, or (layers=[1.5]) not at all
LAYERS = "None, one of ('all', 'lower', 'upper', 'even', 'odd'), a block index or a list of block indices"
REFUSED_EARLY = [
    (dt.LoraConfig, {"layers": [1.5]}, f"layers must be {LAYERS}, got (1.5,)"),
    (dt.IA3Config, {"layers": True}, f"layers must be {LAYERS}, got True"),
    (dt.AdapterConfig, {"layers": "middle"}, f"layers must be {LAYERS}, got 'middle'"),
    (dt.DiffPruningConfig, {"layers": ["1"]}, f"layers must be {LAYERS}, got ('1',)"),
    (dt.LoraConfig, {"dropout": None}, "dropout must be in [0, 1), got None"),
    (dt.LoraConfig, {"dropout": "0.1"}, "dropout must be in [0, 1), got '0.1'"),
    (dt.LoraConfig, {"targets": [3]},
     "targets must be 'all-linear', a regex string or a non-empty list of module names, got (3,)"),
    (dt.LoraConfig, {"targets": []},
     "targets must be 'all-linear', a regex string or a non-empty list of module names, got ()"),
    (dt.LoraConfig, {"exclude": 7}, "exclude must be a regex string or a list of module names, got 7"),
    (dt.AdapterConfig, {"targets": ["o", None]},
     "targets must be a regex string or a non-empty list of module names, got ('o', None)"),
    (dt.CompacterConfig, {"exclude": [""]}, "exclude must be a regex string or a list of module names, got ('',)"),
]


def _ids(cases: list) -> list[str]:
    return [f"{config.__name__}-{next(iter(bad))}" for config, bad, _ in cases]


@pytest.mark.parametrize("config, bad, message", REFUSED, ids=_ids(REFUSED))
def test_a_refusal_names_the_field_the_value_and_what_is_allowed(config, bad, message):
    with pytest.raises(dt.ConfigError) as caught:
        config(**bad)
    assert str(caught.value) == message


@pytest.mark.parametrize("config, bad, message", REFUSED_EARLY, ids=_ids(REFUSED_EARLY))
def test_layer_selections_dropout_and_module_lists_are_checked_when_the_config_is_made(config, bad, message):
    with pytest.raises(dt.ConfigError) as caught:
        config(**bad)
    assert str(caught.value) == message


@pytest.mark.parametrize("config, value, field, stored", [
    (dt.LoraConfig, {"layers": 2}, "layers", (2,)),
    (dt.IA3Config, {"layers": [0, 3]}, "layers", (0, 3)),
    (dt.DiffPruningConfig, {"layers": []}, "layers", ()),
    (dt.LoraConfig, {"targets": "all-linear"}, "targets", "all-linear"),
    (dt.LoraConfig, {"exclude": []}, "exclude", ()),
    (dt.AdapterConfig, {"layers": "upper"}, "layers", "upper"),
    (dt.IA3Config, {"feedforward": []}, "feedforward", ()),
    (dt.BitFitConfig, {"targets": None}, "targets", "all"),
    (dt.DiffPruningConfig, {"targets": r".*\.dense"}, "targets", r".*\.dense"),
    (dt.CompacterConfig, {"phm_rank": None}, "phm_rank", None),
    (dt.LoraConfig, {"modules_to_save": []}, "modules_to_save", ()),
])
def test_allowed_values_are_kept_in_their_stored_form(config, value, field, stored):
    assert getattr(config(**value), field) == stored
