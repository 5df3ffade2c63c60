"""Optimizer, parameter groups and schedule, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

import deltatune as dt
from deltatune.core import precision
from deltatune.errors import ConfigError
from deltatune.train.optim import build_optimizer, build_schedule, parameter_groups, warmup_steps
from deltatune.train.recipe import TrainSpec
from tests.toy_models import build_bert


def _lrs(spec: TrainSpec, total: int) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.SGD([p], lr=spec.lr)
    sched = build_schedule(opt, spec, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_linear_schedule_with_warmup_matches_the_formula():
    spec = TrainSpec(lr=1e-3, warmup=0.2, schedule="linear")
    total = 20
    w = warmup_steps(spec, total)
    assert w == 4
    expected = [1e-3 * (s / w if s < w else (total - s) / (total - w)) for s in range(total)]
    assert _lrs(spec, total) == pytest.approx(expected, abs=1e-12)


def test_cosine_schedule_and_warmup_in_steps():
    spec = TrainSpec(lr=2e-4, warmup=3, schedule="cosine")
    total = 13
    expected = [2e-4 * (s / 3 if s < 3 else 0.5 * (1 + math.cos(math.pi * (s - 3) / (total - 3)))) for s in range(total)]
    assert _lrs(spec, total) == pytest.approx(expected, abs=1e-12)
    assert _lrs(TrainSpec(lr=1e-3, schedule="constant"), 5) == pytest.approx([1e-3] * 5)


def test_optimizer_takes_exactly_the_trainable_parameters():
    model = dt.attach(build_bert(), dt.LoraConfig(r=2, targets=["q", "v"]))
    opt = build_optimizer(model, TrainSpec(weight_decay=0.1))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_opt == trainable and len(trainable) > 0
    # biases and norms get no weight decay, matrices do
    decay = {n for g in parameter_groups(model, TrainSpec(weight_decay=0.1)) if g.weight_decay for n in g.names}
    assert decay and all(not n.endswith("bias") for n in decay)
    assert any(n.endswith("lora_A.default.weight") for n in decay)


def test_layer_decay_scales_each_block_by_its_depth():
    torch.manual_seed(0)
    model = build_bert(layers=4)
    for p in model.parameters():
        p.requires_grad_(True)
    groups = parameter_groups(model, TrainSpec(layer_decay=0.5))
    scale = {n: g.lr_scale for g in groups for n in g.names}
    # ids: embeddings 0, block i -> i + 1, head/pooler 5; scale = 0.5 ** (5 - id)
    assert scale["bert.embeddings.word_embeddings.weight"] == 0.5 ** 5
    for i in range(4):
        assert scale[f"bert.encoder.layer.{i}.attention.self.query.weight"] == 0.5 ** (4 - i)
    assert scale["classifier.weight"] == 1.0
    opt = build_optimizer(model, TrainSpec(lr=1e-3, layer_decay=0.5))
    lrs = {round(g["lr"], 12) for g in opt.param_groups}
    assert lrs == {round(1e-3 * 0.5 ** k, 12) for k in range(6)}


def test_layer_decay_works_for_adapter_parameters_too():
    model = dt.attach(build_bert(layers=4), dt.LoraConfig(r=2, targets=["q"]))
    scale = {n: g.lr_scale for g in parameter_groups(model, TrainSpec(layer_decay=0.8)) for n in g.names}
    assert scale["bert.encoder.layer.0.attention.self.query.lora_A.default.weight"] == pytest.approx(0.8 ** 4)
    assert scale["bert.encoder.layer.3.attention.self.query.lora_B.default.weight"] == pytest.approx(0.8 ** 1)


def test_loraplus_gives_b_a_higher_learning_rate():
    model = dt.attach(build_bert(), dt.LoraConfig(r=2, targets=["q", "v"]))
    opt = build_optimizer(model, TrainSpec(lr=1e-4, lora_plus_ratio=16))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            assert lr_of[id(p)] == pytest.approx(1.6e-3)
        elif ".lora_A." in name:
            assert lr_of[id(p)] == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="LoRA's B matrices"):
        build_optimizer(_head_only_model(), TrainSpec(lora_plus_ratio=4))


def _head_only_model():
    model = build_bert()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier"))
    return model


def test_auto_precision_follows_the_hardware():
    native = bool(torch.cpu._is_avx512_bf16_supported()) or bool(getattr(torch.cpu, "_is_amx_tile_supported",
                                                                         lambda: False)())
    assert precision.cpu_has_native_bf16() == native
    assert precision.resolve("auto", torch.device("cpu")) == ("bf16" if native else "fp32")
    assert precision.resolve("fp32", torch.device("cpu")) == "fp32"
    if not native:
        with pytest.warns(UserWarning, match="emulated"):
            assert precision.resolve("bf16", torch.device("cpu")) == "bf16"


def test_adamw8bit_keeps_8_bit_state_and_trains():
    """train.optimizer: adamw8bit is bitsandbytes' AdamW8bit (block-wise 8-bit moments); it must
    still minimise a loss like AdamW does."""
    pytest.importorskip("bitsandbytes", reason="the 8-bit optimizer comes from bitsandbytes (quant extra)")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False))  # 4,096 weights: bnb's 8-bit threshold
    target = torch.randn(64, 64)
    opt = build_optimizer(model, TrainSpec(optimizer="adamw8bit", lr=1e-2))
    first = None
    for _ in range(50):
        loss = ((model[0].weight - target) ** 2).mean()
        first = float(loss) if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad()
    state = opt.state[model[0].weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert float(((model[0].weight - target) ** 2).mean()) < 0.7 * first


@pytest.mark.parametrize("schedule, warmup", [("linear", 0.0), ("linear", 0.1), ("cosine", 0.06), ("cosine", 5),
                                              ("constant", 0.0), ("constant", 0.25)])
def test_schedules_equal_transformers_get_scheduler(schedule, warmup):
    from transformers import get_scheduler  # the reference our own schedule replaces (start-up time)

    spec = TrainSpec(lr=1e-3, warmup=warmup, schedule=schedule)
    total = 37
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=spec.lr)
    name = {"constant": "constant_with_warmup"}.get(schedule, schedule)
    theirs = get_scheduler(name, opt, num_warmup_steps=warmup_steps(spec, total), num_training_steps=total)
    q = torch.nn.Parameter(torch.zeros(1))
    ours_opt = torch.optim.SGD([q], lr=spec.lr)
    ours = build_schedule(ours_opt, spec, total)
    for _ in range(total + 2):  # past the end too
        assert ours_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        for o, s in ((opt, theirs), (ours_opt, ours)):
            o.step()
            s.step()
