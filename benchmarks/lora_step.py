"""One LoRA (or IA3) training step, deltatune vs HF peft, side by side.

On the embedded MiniLM, batch 32 x 128 tokens (``--model smollm2``: SmolLM2-135M's architecture,
batch 8 x 512, the CUDA column), LoRA r=8 on q and v (``--method ia3``: IA3 on k, v and the
feed-forward output), AdamW. Times fp32 and, where the hardware has it natively, bf16 autocast,
against the frozen-model lower bound (forward + activation gradients, no adapter) in the same
process, and on the CPU also against the frozen model with deltatune's CPU dropout masks, which
deltatune's models draw in training mode (the bound that leaves the adapter's own cost);
interleaved, each variant's fastest round (common.fastest says why): wall clock at torch's
default thread count (the headline) and, on the CPU, one-thread CPU time beside it
(common.clock_modes). Counts the memory a training step holds. ``--rss`` also reads the peak
memory of a step, each variant in its own process (coarse on the CPU: it depends on what the
allocator keeps). Prints one JSON line with the ratios. Adapter loading has its own benchmark
(adapter_load.py).

    python benchmarks/lora_step.py [--method lora|ia3] [--model minilm|smollm2] [--rounds 5] [--rss]
                                   [--device cpu|cuda] [--default-allocator]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ClockMode, allocator_note, each_clock, fastest, interleaved_times, medians,  # noqa: E402
                    finish, peak_rss_mib, reset_peak_rss, rss_mib, run_probe, steady_allocator, step_benchmark,
                    training_memory_mib)

import transformers  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.core.attention_dropout import CpuDropout  # noqa: E402
from deltatune.core.precision import autocast  # noqa: E402

transformers.logging.set_verbosity_error()
VARIANTS = ("deltatune", "deltatune-other", "peft", "frozen")
#: the frozen model with deltatune's CPU dropout masks (core/attention_dropout.py), which deltatune's
#: own variants draw in training mode: the bound that leaves only what the adapter itself costs
SAME_DROPOUT = "frozen-same-dropout"
RANK, ALPHA = 8, 16


def smollm2_config(layers: int = 30) -> transformers.LlamaConfig:
    """The architecture of SmolLM2-135M (a Llama). tests/test_benchmark_workloads.py checks it
    against the embedded model's own config; ``layers`` shrinks it for that test only."""
    return transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2)


@dataclass(frozen=True)
class Workload:
    """What a step benchmark trains: a base model, the batch shape, and its parts in peft's names."""

    name: str
    batch: int
    length: int
    build: Callable[[], torch.nn.Module]
    task_type: str  #: peft's task type
    peft_lora_targets: tuple[str, ...]  #: LoRA's q and v
    #: peft IA3Config arguments that pick deltatune's default IA3 modules; empty: peft's defaults do
    peft_ia3: dict = field(default_factory=dict)


WORKLOADS = {
    # the CPU suite: the embedded MiniLM, batch 32 x 128. peft's IA3 defaults for BERT match
    # "output.dense" as a suffix, so they would also scale every attention output projection.
    "minilm": Workload("minilm", 32, 128, lambda: dt.load_model("minilm", num_labels=2, quiet=True),
                       "SEQ_CLS", ("query", "value"),
                       {"target_modules": r".*\.(key|value)|.*\.layer\.\d+\.output\.dense",
                        "feedforward_modules": r".*\.layer\.\d+\.output\.dense"}),
    # the CUDA column: SmolLM2-135M's architecture, batch 8 x 512. The weights are random: a step
    # costs the same whatever their values, and the GPU machine has neither the GGUF file nor gguf.
    "smollm2": Workload("smollm2", 8, 512, lambda: transformers.LlamaForCausalLM(smollm2_config()),
                        "CAUSAL_LM", ("q_proj", "v_proj")),
}
MINILM = WORKLOADS["minilm"]


def base_model(device: str, workload: Workload = MINILM) -> torch.nn.Module:
    torch.manual_seed(0)
    return workload.build().to(device)


def layer_class(method: str) -> type:
    from deltatune.methods.ia3.layer import IA3Linear
    from deltatune.methods.lora import LoraLinear
    return IA3Linear if method == "ia3" else LoraLinear


def other_path(method: str) -> str:
    """The path deltatune does not take by default ("fused" or "plain"), timed alongside."""
    return "plain" if layer_class(method).use_fused else "fused"


def adapt(base: torch.nn.Module, variant: str, method: str = "lora", workload: Workload = MINILM) -> torch.nn.Module:
    """The model a variant trains: deltatune's method (its default path, or the other one),
    peft's, or the frozen base (lower bound)."""
    if variant.startswith("deltatune"):
        config = dt.IA3Config() if method == "ia3" else dt.LoraConfig(r=RANK, alpha=ALPHA, targets=["q", "v"])
        model = dt.attach(base, config)
        if variant == "deltatune-other":
            cls, fused = layer_class(method), other_path(method) == "fused"
            for _, layer in model.adapter_layers():
                if isinstance(layer, cls):
                    layer.use_fused = fused
        return model
    if variant == "peft":
        import peft
        if method == "ia3":  # key, value and the feed-forward output (input-scaled), as deltatune's defaults
            return peft.get_peft_model(base, peft.IA3Config(task_type=workload.task_type, **workload.peft_ia3))
        return peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, task_type=workload.task_type,
                                                         target_modules=list(workload.peft_lora_targets)))
    for p in base.parameters():  # the frozen bound, with torch's dropout or deltatune's (SAME_DROPOUT)
        p.requires_grad_(False)
    # gradients must still flow through every block, as they do for LoRA on the first layer
    base.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())
    return base


def batch(device: str, workload: Workload = MINILM) -> dict[str, torch.Tensor]:
    """The same random batch on every call: labels are the tokens for a causal LM, a class else."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (workload.batch, workload.length), generator=g)
    labels = ids if workload.task_type == "CAUSAL_LM" else torch.randint(0, 2, (workload.batch,), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def make_step(model: torch.nn.Module, data: dict, device: str, precision: str, same_dropout: bool = False):
    """One training step of ``model``; ``same_dropout``: its forward draws dropout masks as
    deltatune's models do on a CPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    model.train()
    sites = CpuDropout(model) if same_dropout else None

    def step() -> None:
        with autocast(precision, torch.device(device))(), sites.active() if sites else contextlib.nullcontext():
            loss = model(**data).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def time_steps(device: str, precision: str, rounds: int, method: str, workload: Workload = MINILM) -> dict:
    data = batch(device, workload)
    # deltatune's dropout masks are a CPU matter: on CUDA the same-dropout bound is the frozen one
    variants = (*VARIANTS, SAME_DROPOUT) if device == "cpu" else VARIANTS
    models = {v: adapt(base_model(device, workload), v, method, workload) for v in variants}
    memory = {}
    for v in ("deltatune", "peft", "frozen"):
        def forward(model=models[v]):
            with autocast(precision, torch.device(device))():
                return model.train()(**data).loss
        memory[v] = training_memory_mib(models[v], forward)
    steps = {v: make_step(models[v], data, device, precision, same_dropout=v == SAME_DROPOUT) for v in variants}

    def measure(mode: ClockMode) -> dict:
        return step_ratios(interleaved_times(steps, rounds=rounds, device=device, now=mode.now), method, rounds)

    return {
        **each_clock(device, measure),
        "training_memory_mib": memory,
        "training_memory_ratio_vs_peft": round(memory["deltatune"]["total_mib"] / memory["peft"]["total_mib"], 3),
    }


def step_ratios(times: dict[str, list[float]], method: str, rounds: int) -> dict:
    """The step figures of one clock: each variant's fastest round and the ratios between them."""
    best, med = fastest(times), medians(times)
    return {
        **{f"{v}_s": round(best[v], 4) for v in ("deltatune", "peft", "frozen")},
        "ratio_vs_peft": round(best["deltatune"] / best["peft"], 3),
        "ratio_vs_frozen": round(best["deltatune"] / best["frozen"], 3),
        "peft_ratio_vs_frozen": round(best["peft"] / best["frozen"], 3),
        "other_path": {"path": other_path(method), "s": round(best["deltatune-other"], 4),
                       "ratio_vs_frozen": round(best["deltatune-other"] / best["frozen"], 3)},
        "median_ratios_vs_frozen": {v: round(med[v] / med["frozen"], 3) for v in ("deltatune", "peft")},
        **({"frozen_same_dropout_s": round(best[SAME_DROPOUT], 4),
            "ratio_vs_frozen_same_dropout": round(best["deltatune"] / best[SAME_DROPOUT], 3),
            "other_path_ratio_vs_frozen_same_dropout": round(best["deltatune-other"] / best[SAME_DROPOUT], 3)}
           if SAME_DROPOUT in best else {}),
        "rounds": rounds,
    }


def probe(variant: str, device: str, precision: str, method: str, workload: str) -> None:
    """Child process: peak memory a step adds on top of the loaded model, MiB (on CUDA also the
    peak the caching allocator handed out)."""
    load = WORKLOADS[workload]
    step = make_step(adapt(base_model(device, load), variant, method, load), batch(device, load), device, precision)
    step()  # first step allocates optimizer state and warms the allocator
    before = rss_mib()
    reset_peak_rss()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step()
    out = {"step_peak_mib": round(peak_rss_mib() - before, 1), "rss_mib": round(before, 1)}
    if device == "cuda":
        out["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["lora", "ia3"], default="lora")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--model", choices=list(WORKLOADS), default="minilm",
                        help="minilm: batch 32 x 128 (the CPU suite); smollm2: SmolLM2-135M's shape, batch 8 x 512")
    parser.add_argument("--rss", action="store_true",
                        help="also measure peak memory (RSS; on CUDA also the device's), one process per variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--default-allocator", action="store_true",
                        help="keep the C allocator's defaults (page faults add noise: common.steady_allocator)")
    parser.add_argument("--probe", nargs=5, metavar=("VARIANT", "DEVICE", "PRECISION", "METHOD", "MODEL"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(*args.probe)
        return
    if not args.default_allocator:
        steady_allocator(sys.argv)
    workload = WORKLOADS[args.model]
    result, precisions = step_benchmark(f"{args.method}_step", args.device, model=workload.name, batch=workload.batch,
                                        length=workload.length, **({"rank": RANK} if args.method == "lora" else {}))
    result["allocator"] = allocator_note()
    for precision in precisions:
        timing = time_steps(args.device, precision, args.rounds, args.method, workload)
        if args.rss:
            peaks = {v: run_probe(__file__, v, args.device, precision, args.method, workload.name)
                     for v in ("deltatune", "peft")}
            key = "cuda_peak_mib" if args.device == "cuda" else "step_peak_mib"
            timing[key] = {v: peaks[v][key] for v in peaks}
            # the resident set may not grow at all when the allocator reuses freed blocks: no ratio then
            peft_peak = peaks["peft"][key]
            timing["memory_ratio_vs_peft"] = (round(peaks["deltatune"][key] / peft_peak, 3) if peft_peak > 0 else None)
        result[precision] = timing
    finish(result, headline(result, precisions))


def headline(result: dict, precisions: list[str]) -> list[str]:
    """The figures the issue tracks, one line per precision."""
    lines = []
    for precision in precisions:
        r = result[precision]
        cpu = r.get("cpu_1thread")

        def same(figures: dict) -> str:
            own = figures.get("ratio_vs_frozen_same_dropout")
            return f", with the same dropout {own:.3f}" if own is not None else ""
        beside = (f"; 1-thread CPU time: {cpu['ratio_vs_frozen']:.3f} (peft {cpu['peft_ratio_vs_frozen']:.3f})"
                  f"{same(cpu)}, vs peft {cpu['ratio_vs_peft']:.3f}" if cpu else "")
        lines.append(f"{result['benchmark']} {precision}: deltatune / frozen bound {r['ratio_vs_frozen']:.3f} "
                     f"(peft {r['peft_ratio_vs_frozen']:.3f}){same(r)}, deltatune / peft {r['ratio_vs_peft']:.3f} "
                     f"[wall, {result['machine']['threads']} threads]{beside}")
    return lines


if __name__ == "__main__":
    main()
