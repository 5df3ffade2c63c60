"""The step benchmarks' workloads: the GPU suite's model has SmolLM2-135M's architecture, and on
both workloads deltatune and peft adapt the same modules, so their steps compare like for like.

The benchmarks themselves are measured by benchmarks/run_all.py, never here; these tests run the
benchmark's own code once, on a shrunken model, so that the GPU suite (which only a lent GPU runs)
does not first fail there.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lora_step  # noqa: E402

from deltatune.core.loading import resolve_model  # noqa: E402

SHAPE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "hidden_act", "tie_word_embeddings", "attention_bias", "mlp_bias")


def test_smollm2_workload_has_the_embedded_models_architecture():
    source = resolve_model("smollm2")  # the GGUF file's metadata; its weights are not read
    embedded = transformers.AutoConfig.from_pretrained(source.path, **source.pretrained_kwargs())
    ours = lora_step.smollm2_config()
    assert type(ours) is type(embedded)
    assert {k: getattr(ours, k) for k in SHAPE} == {k: getattr(embedded, k) for k in SHAPE}
    assert ours.rope_parameters["rope_theta"] == embedded.rope_parameters["rope_theta"]
    assert ours.rms_norm_eps == pytest.approx(embedded.rms_norm_eps)


def _tiny_smollm2() -> lora_step.Workload:
    """Two of SmolLM2's 30 layers, batch 2 x 16: the same modules, seconds instead of minutes."""
    return replace(lora_step.WORKLOADS["smollm2"], batch=2, length=16,
                   build=lambda: transformers.LlamaForCausalLM(lora_step.smollm2_config(layers=2)))


#: what each library puts before the base model's own module paths
PREFIX = {"deltatune": "base_model.", "peft": "base_model.model."}


def _adapted_modules(model: torch.nn.Module, library: str) -> set[str]:
    """Paths, in the base model, of the modules that have a trainable adapter part."""
    paths = set()
    for name, p in model.named_parameters():
        if p.requires_grad and ("lora_" in name or "ia3_l" in name):
            path = name.split(".lora_")[0].split(".ia3_l")[0].removesuffix(".base_layer")
            paths.add(path.removeprefix(PREFIX[library]))
    return paths


@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("workload", ["minilm", "smollm2"])
def test_deltatune_and_peft_adapt_the_same_modules(workload, method):
    load = lora_step.WORKLOADS[workload] if workload == "minilm" else _tiny_smollm2()
    models = {v: lora_step.adapt(lora_step.base_model("cpu", load), v, method, load) for v in ("deltatune", "peft")}
    ours, theirs = (_adapted_modules(models[v], v) for v in ("deltatune", "peft"))
    assert ours and ours == theirs
    counts = {v: sum(p.numel() for n, p in m.named_parameters() if p.requires_grad and ("lora_" in n or "ia3_l" in n))
              for v, m in models.items()}
    assert counts["deltatune"] == counts["peft"]


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_step_benchmark_runs_on_the_gpu_suites_model(method):
    result = lora_step.time_steps("cpu", "fp32", rounds=1, method=method, workload=_tiny_smollm2())
    # on a CPU also the frozen model with deltatune's dropout masks
    for key in ("ratio_vs_frozen", "peft_ratio_vs_frozen", "ratio_vs_peft", "training_memory_ratio_vs_peft",
                "ratio_vs_frozen_same_dropout"):
        assert result[key] > 0
    memory = result["training_memory_mib"]
    # an adapter adds its own saved tensors and optimizer state to what the frozen model keeps
    assert memory["deltatune"]["total_mib"] > memory["frozen"]["total_mib"]
    assert memory["peft"]["total_mib"] > memory["frozen"]["total_mib"]


def test_peak_memory_probe_runs_on_the_gpu_suites_model(monkeypatch, capsys):
    monkeypatch.setitem(lora_step.WORKLOADS, "smollm2", _tiny_smollm2())
    lora_step.probe("deltatune", "cpu", "fp32", "lora", "smollm2")
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["rss_mib"] > 0 and "step_peak_mib" in out


def test_mixed_batch_benchmark_builds_on_the_gpu_suites_model(tmp_path):
    """The mixed batch on a Llama: 8 rows, each its own adapter, equal to peft's answer."""
    import mixed_batch
    reference, ours, names, inputs = mixed_batch.build("cpu", replace(_tiny_smollm2(), batch=8))
    assert sorted(set(names)) == [f"a{i}" for i in range(mixed_batch.ADAPTERS)]
    theirs = mixed_batch.peft_model(reference, ours, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs, adapter_names=names).logits,
                                   theirs(**inputs, adapter_names=names).logits)


def test_epoch_benchmark_recipe_has_the_reference_runs_settings(tmp_path):
    """benchmarks/epoch.py's recipe is valid and trains what its peft + Trainer side trains."""
    import epoch

    from deltatune.train.recipe import load as load_recipe

    path = tmp_path / "epoch.yaml"
    path.write_text(epoch.recipe_text(tmp_path / "sst2", 4000, tmp_path / "run", seed=2))
    recipe = load_recipe(str(path))
    assert recipe.method == {"type": "lora", "r": epoch.RANK, "alpha": epoch.ALPHA, "targets": ["q", "v"]}
    spec = recipe.train
    assert (spec.epochs, spec.batch_size, spec.lr, spec.schedule, spec.warmup, spec.precision, spec.seed) == (
        1, epoch.BATCH, epoch.LR, "linear", 0.0, "fp32", 2)
    # transformers.Trainer's defaults, which the reference keeps
    assert (spec.weight_decay, spec.max_grad_norm, spec.grad_accum) == (0.0, 1.0, 1)
    assert (recipe.data.max_train, recipe.data.max_length) == (4000, epoch.MAX_LENGTH)
