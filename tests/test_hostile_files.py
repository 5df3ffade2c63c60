"""A seeded fuzz of damaged and hostile adapter folders (issue 16).

Every case must end in a deltatune error with a short message, quickly (no regex or parser hang),
and leave the model exactly as it was: for ``dt.load(base, folder)`` the plain base (modules,
outputs, ``requires_grad`` flags), for ``model.load(folder)`` the adapted model (adapters, active
ones, modules, outputs, flags). The few mutations that happen to be valid must load and give
finite outputs.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from tests.toy_models import TOYS, assert_same, is_head_copy, logits, module_types, randomize

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
BERT = TOYS["bert"]
SEED = 16
#: seconds one load may take: a sane one takes milliseconds, a regex hang would take hours
LOAD_LIMIT_S = 5.0

#: regexes that backtrack catastrophically in Python's re (the issue's, and one slow in any engine)
HOSTILE_REGEXES = [r"^(\w+\.?)*!$", r"((.*)*)*x$", r"(.*)*x$", r"(.*){1,8}[bc]", r"(\w|\w)*\.Z", "((a", "*"]
#: values no config field should take quietly
HOSTILE_VALUES = [
    "false", "true", "", "x" * 5000, 2**31, 10**9, -1, 0, 2.5, float("inf"), float("-inf"), float("nan"),
    True, None, [], {}, [[["q"]]], {"query": {"deep": 1}}, [1, 2], ["query", 3], {"(.*)*x$": 4},
]
FIELDS = ["r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform", "bias",
          "init_lora_weights", "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save", "task_type",
          "base_model_name_or_path", "peft_type"]


# --- the damage ----------------------------------------------------------------------------

def _config(folder: Path) -> dict:
    return json.loads((folder / CONFIG).read_text())


def _set(key: str, value):
    def damage(folder: Path) -> None:
        data = _config(folder)
        data[key] = value
        (folder / CONFIG).write_text(json.dumps(data))  # NaN and Infinity as JSON's common extension
    return damage


def _pattern_key(key: str, pattern: str):
    return _set(key, {pattern: 4 if key == "rank_pattern" else 8})


def _raw_config(text: str | bytes):
    def damage(folder: Path) -> None:
        (folder / CONFIG).write_bytes(text if isinstance(text, bytes) else text.encode())
    return damage


def _flip_bytes(name: str, rng: random.Random, head: int | None = None):
    offsets = [rng.randrange(head or 10**9) for _ in range(rng.randint(1, 4))]

    def damage(folder: Path) -> None:
        data = bytearray((folder / name).read_bytes())
        for offset in offsets:
            data[offset % len(data)] ^= 1 << (offset % 8)
        (folder / name).write_bytes(bytes(data))
    return damage


def _truncate(name: str, fraction: float):
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: int(len(data) * fraction)])
    return damage


def _tensors(edit):
    def damage(folder: Path) -> None:
        tensors = load_file(str(folder / WEIGHTS))
        edit(tensors, sorted(tensors))
        save_file(tensors, str(folder / WEIGHTS))
    return damage


def _poison(index: int, value: float):
    def edit(tensors, keys):
        key = keys[index % len(keys)]
        tensors[key] = tensors[key].clone().view(-1).index_fill(0, torch.tensor([0]), value).view(tensors[key].shape)
    return edit


def _retype(index: int, dtype: torch.dtype):
    def edit(tensors, keys):
        key = keys[index % len(keys)]
        tensors[key] = (tensors[key] > 0).to(dtype)
    return edit


def _reshape(index: int):
    def edit(tensors, keys):
        key = keys[index % len(keys)]
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    return edit


def cases() -> dict[str, object]:
    """Case name -> a function that damages a copy of a valid folder; a few hundred, seeded."""
    rng = random.Random(SEED)
    out: dict[str, object] = {}
    for key in FIELDS:
        for i, value in enumerate(rng.sample(HOSTILE_VALUES, 12)):
            out[f"field-{key}-{i}"] = _set(key, value)
    for i, pattern in enumerate(HOSTILE_REGEXES):
        out[f"regex-targets-{i}"] = _set("target_modules", pattern)
        out[f"regex-exclude-{i}"] = _set("exclude_modules", pattern)
        out[f"regex-rank-key-{i}"] = _pattern_key("rank_pattern", pattern)
        out[f"regex-alpha-key-{i}"] = _pattern_key("alpha_pattern", pattern)
    for depth in (50, 1_000, 100_000):
        out[f"json-nested-{depth}"] = _raw_config('{"r": 8, "x": ' + "[" * depth + "]" * depth + "}")
    for i, text in enumerate([b"", b"\xff\xfe{}", b'{"r": NaN}', b"null", b"[]", b"42", b'"LORA"', b"{" * 20,
                              b'{"peft_type": "LORA", "r": 8' + b", \"k\": 1" * 10, b"\x00" * 64]):
        out[f"json-raw-{i}"] = _raw_config(text)
    for i in range(12):
        out[f"json-flip-{i}"] = _flip_bytes(CONFIG, rng)
        out[f"json-cut-{i}"] = _truncate(CONFIG, rng.random())
    for i in range(12):
        out[f"weights-header-flip-{i}"] = _flip_bytes(WEIGHTS, rng, head=200)
        out[f"weights-cut-{i}"] = _truncate(WEIGHTS, rng.random())
    for i in range(8):
        index = rng.randrange(100)
        out[f"weights-nan-{i}"] = _tensors(_poison(index, float("nan")))
        out[f"weights-inf-{i}"] = _tensors(_poison(index, float("inf") * (-1) ** i))
        out[f"weights-int-{i}"] = _tensors(_retype(index, torch.int64 if i % 2 else torch.int8))
        out[f"weights-bool-{i}"] = _tensors(_retype(index, torch.bool))
        out[f"weights-shape-{i}"] = _tensors(_reshape(index))
    out["weights-random-bytes"] = lambda f: (f / WEIGHTS).write_bytes(random.Random(SEED).randbytes(4096))
    out["weights-huge-header-length"] = lambda f: (f / WEIGHTS).write_bytes((2**62).to_bytes(8, "little") + b"{}")
    return out


CASES = cases()


# --- the checks ----------------------------------------------------------------------------

class _Hung(Exception):
    pass


def _timed(call):
    """``(result or exception, seconds)``; an alarm ends a load that hangs, failing the test."""
    def alarm(*_):
        raise _Hung("the load did not return")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(LOAD_LIMIT_S) * 4)
    began = time.perf_counter()
    try:
        try:
            return call(), time.perf_counter() - began
        except Exception as exc:  # noqa: BLE001 - judged by the caller
            return exc, time.perf_counter() - began
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _state(model: torch.nn.Module) -> dict:
    adapted = isinstance(model, dt.AdaptedModel)
    return {"types": module_types(model), "grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "names": model.adapter_names if adapted else None, "active": model.active_adapters if adapted else None}


def _judge(case: str, outcome, seconds: float, model, before: dict, expected_logits) -> bool:
    """True when the load failed as it must; False when it (validly) succeeded."""
    assert seconds < LOAD_LIMIT_S, f"{case}: the load took {seconds:.1f}s"
    if isinstance(outcome, Exception):
        assert isinstance(outcome, dt.DeltatuneError), f"{case}: {type(outcome).__name__}: {outcome}"
        message = str(outcome)
        assert 10 < len(message) < 1500, f"{case}: message of {len(message)} characters: {message[:300]}"
        assert _state(model) == before, f"{case}: the failed load changed the model"
        assert_same(logits(model, BERT.batch()), expected_logits)
        return True
    assert torch.isfinite(logits(outcome, BERT.batch())).all(), f"{case}: loaded, but gives non-finite outputs"
    return False


@pytest.fixture(scope="module")
def valid_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = dt.attach(BERT.base(), dt.LoraConfig(r=8, alpha=16, init="random", targets=["q", "v"]))
    folder = tmp_path_factory.mktemp("valid") / "adapter"
    randomize(model, only=is_head_copy).save(folder)
    return folder


def test_the_fuzz_has_a_few_hundred_cases_and_the_valid_folder_loads(valid_folder):
    assert len(CASES) >= 300
    assert torch.isfinite(logits(dt.load(BERT.base(), valid_folder), BERT.batch())).all()


@pytest.mark.parametrize("group", ["field", "regex", "json", "weights"])
def test_every_damaged_folder_is_a_clear_error_that_leaves_the_model_as_it_was(valid_folder, tmp_path, group):
    names = [n for n in CASES if n.startswith(group + "-")]
    base = BERT.base()
    for p in list(base.parameters())[:3]:
        p.requires_grad_(False)  # a base with mixed flags: a failed load must restore them exactly
    adapted = dt.attach(BERT.base(), dt.LoraConfig(r=4, init="random", targets=["q", "k"])).eval()
    refused = 0
    for i, case in enumerate(names):
        folder = tmp_path / f"case-{i}"
        shutil.copytree(valid_folder, folder)
        CASES[case](folder)

        before, expected = _state(base), logits(base, BERT.batch())
        outcome, seconds = _timed(lambda: dt.load(base, folder))
        failed = _judge(f"dt.load {case}", outcome, seconds, base, before, expected)
        if not failed:
            base = BERT.base()  # it now carries the adapter: start the next case from a fresh one

        before, expected = _state(adapted), logits(adapted, BERT.batch())
        outcome, seconds = _timed(lambda: adapted.load(folder, name="second"))
        if not isinstance(outcome, Exception):
            outcome = adapted
        assert _judge(f"model.load {case}", outcome, seconds, adapted, before, expected) == failed, case
        if not failed:
            adapted.remove("second")
        refused += failed
        shutil.rmtree(folder)
    # a mutation may be harmless (a field set to its default, an exclude regex that matches nothing
    # and answers at once); most must not be
    share = 0.5 if group == "regex" else 0.85
    assert refused >= share * len(names), f"only {refused} of {len(names)} {group} cases were refused"


@pytest.mark.parametrize("key, pattern", [("target_modules", r"(.*){1,8}[bc]"), ("rank_pattern", r"(.*){1,8}[bc]"),
                                          ("exclude_modules", r"^(\w+\.?)*!$")])
def test_a_catastrophic_regex_is_a_config_error_naming_its_field(valid_folder, tmp_path, key, pattern):
    folder = tmp_path / "adapter"
    shutil.copytree(valid_folder, folder)
    (_pattern_key(key, pattern) if key == "rank_pattern" else _set(key, pattern))(folder)
    outcome, seconds = _timed(lambda: dt.load(BERT.base(), folder))
    assert seconds < LOAD_LIMIT_S
    if key == "exclude_modules":  # the regex package answers this one at once: no error, no hang
        assert isinstance(outcome, dt.AdaptedModel)
        return
    assert isinstance(outcome, dt.ConfigError), outcome
    assert ("targets" if key == "target_modules" else key) in str(outcome)
    assert "backtracks" in str(outcome)


@pytest.mark.parametrize("value, field", [("false", "use_rslora"), (float("inf"), "lora_alpha"),
                                          (2**31, "r"), (10**9, "r"), ([1], "rank_pattern"), (7, "task_type"),
                                          (["m"], "base_model"), ({"query": "4"}, "rank_pattern")])
def test_a_wrongly_typed_or_absurd_field_is_a_config_error_naming_it(valid_folder, tmp_path, value, field):
    folder = tmp_path / "adapter"
    shutil.copytree(valid_folder, folder)
    _set({"base_model": "base_model_name_or_path"}.get(field, field), value)(folder)
    with pytest.raises(dt.ConfigError, match=field):
        dt.load(BERT.base(), folder)


def test_non_finite_weights_load_only_when_asked_for(valid_folder, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(valid_folder, folder)
    _tensors(_poison(0, float("nan")))(folder)
    key = sorted(load_file(str(folder / WEIGHTS)))[0]
    with pytest.raises(dt.AdapterFileError, match=f"{key}.*allow_nonfinite=True"):
        dt.load(BERT.base(), folder)
    model = dt.load(BERT.base(), folder, allow_nonfinite=True)
    assert any(torch.isnan(p).any() for p in model.parameters()), "the escape hatch must load the NaN as it is"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_the_finiteness_check_finds_one_bad_value_among_many_tensors(dtype, bad, tmp_path):
    from deltatune.core.state import check_tensors

    tensors = {f"t{i}": torch.randn(3, 5).to(dtype) for i in range(6)}
    tensors.update({"empty": torch.zeros(0, dtype=dtype), "ids": torch.arange(4),
                    "huge": torch.full((2,), torch.finfo(dtype).max, dtype=dtype)})
    check_tensors(tensors, tmp_path)  # finite, however large: accepted
    tensors["t4"][2, 1] = bad
    with pytest.raises(dt.AdapterFileError, match="t4 holds 1 NaN or infinite"):
        check_tensors(tensors, tmp_path)
    check_tensors(tensors, tmp_path, allow_nonfinite=True)


def test_a_failed_load_unwraps_a_layer_it_had_wrapped_already(valid_folder, tmp_path):
    """A rank_pattern that fails on the first path fails after that layer was wrapped."""
    folder = tmp_path / "adapter"
    shutil.copytree(valid_folder, folder)
    _pattern_key("rank_pattern", r"(.*){1,8}[bc]")(folder)
    model = dt.attach(BERT.base(), dt.LoraConfig(r=4, targets=["k"]))
    types = module_types(model)
    with pytest.raises(dt.ConfigError):
        model.load(folder, name="second")
    assert module_types(model) == types


@pytest.mark.parametrize("damage", ["json-nested-100000", "weights-header-flip-0", "weights-cut-3", "json-raw-1"])
def test_the_cli_reports_a_bad_folder_in_one_line(valid_folder, tmp_path, capsys, damage):
    from deltatune.cli import main

    folder = tmp_path / "adapter"
    shutil.copytree(valid_folder, folder)
    CASES[damage](folder)
    commands = [["inspect", str(folder)]]
    if damage == "json-nested-100000":  # serve reads the folder's facts before loading any model
        commands.append(["serve", "--model", str(tmp_path / "no-model"), "--adapters", f"x={folder}"])
    for argv in commands:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith(f"deltatune {argv[0]}: error: ") and err.count("\n") == 1, err
        assert "Traceback" not in err
