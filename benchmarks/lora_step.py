"""One LoRA (or IA3) training step on the embedded MiniLM, deltatune vs HF peft, side by side.

Batch 32 x 128 tokens, LoRA r=8 on q and v (``--method ia3``: IA3 on k, v and the FFN), AdamW.
Times fp32 and, where the hardware has it natively, bf16 autocast, against the frozen-model lower
bound (forward + activation gradients, no adapter) in the same process, and counts the memory a
training step holds. ``--rss`` also reads the peak resident set of a step, each variant in its
own process (coarse: it depends on what the allocator keeps). Prints one JSON line with the ratios.
Adapter loading has its own benchmark (adapter_load.py).

    python benchmarks/lora_step.py [--method lora|ia3] [--rounds 5] [--rss] [--device cpu|cuda] [--default-allocator]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (allocator_note, interleaved_medians, peak_rss_mib, reset_peak_rss, rss_mib,  # noqa: E402
                    run_probe, steady_allocator, step_benchmark, training_memory_mib)

import transformers  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.train.precision import autocast  # noqa: E402

transformers.logging.set_verbosity_error()
VARIANTS = ("deltatune", "deltatune-other", "peft", "frozen")
BATCH, LENGTH, RANK, ALPHA = 32, 128, 8, 16


def base_model(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return dt.load_model("minilm", num_labels=2, quiet=True).to(device)


def layer_class(method: str) -> type:
    from deltatune.methods.ia3.layer import IA3Linear
    from deltatune.methods.lora import LoraLinear
    return IA3Linear if method == "ia3" else LoraLinear


def other_path(method: str) -> str:
    """The path deltatune does not take by default ("fused" or "plain"), timed alongside."""
    return "plain" if layer_class(method).use_fused else "fused"


def adapt(base: torch.nn.Module, variant: str, method: str = "lora") -> torch.nn.Module:
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
        if method == "ia3":  # peft's defaults for BERT: key, value, output.dense (feed-forward)
            return peft.get_peft_model(base, peft.IA3Config(task_type="SEQ_CLS"))
        return peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["query", "value"],
                                                         task_type="SEQ_CLS"))
    for p in base.parameters():
        p.requires_grad_(False)
    # gradients must still flow through every block, as they do for LoRA on the first layer
    base.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())
    return base


def batch(device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (BATCH, LENGTH), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": torch.randint(0, 2, (BATCH,), generator=g).to(device)}


def make_step(model: torch.nn.Module, data: dict, device: str, precision: str):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    model.train()

    def step() -> None:
        with autocast(precision, torch.device(device))():
            loss = model(**data).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def time_steps(device: str, precision: str, rounds: int, method: str) -> dict:
    data = batch(device)
    models = {v: adapt(base_model(device), v, method) for v in VARIANTS}
    memory = {}
    for v in ("deltatune", "peft", "frozen"):
        def forward(model=models[v]):
            with autocast(precision, torch.device(device))():
                return model.train()(**data).loss
        memory[v] = training_memory_mib(models[v], forward)
    steps = {v: make_step(models[v], data, device, precision) for v in VARIANTS}
    med = interleaved_medians(steps, rounds=rounds, device=device)
    return {
        "deltatune_s": round(med["deltatune"], 4), "peft_s": round(med["peft"], 4), "frozen_s": round(med["frozen"], 4),
        "ratio_vs_peft": round(med["deltatune"] / med["peft"], 3),
        "ratio_vs_frozen": round(med["deltatune"] / med["frozen"], 3),
        "peft_ratio_vs_frozen": round(med["peft"] / med["frozen"], 3),
        "other_path": {"path": other_path(method), "s": round(med["deltatune-other"], 4),
                       "ratio_vs_frozen": round(med["deltatune-other"] / med["frozen"], 3)},
        "training_memory_mib": memory,
        "training_memory_ratio_vs_peft": round(memory["deltatune"]["total_mib"] / memory["peft"]["total_mib"], 3),
    }


def probe(variant: str, device: str, precision: str, method: str) -> None:
    """Child process: peak memory a step adds on top of the loaded model, MiB."""
    step = make_step(adapt(base_model(device), variant, method), batch(device), device, precision)
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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS, one process per variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--default-allocator", action="store_true",
                        help="keep the C allocator's defaults (page faults add noise: common.steady_allocator)")
    parser.add_argument("--probe", nargs=4, metavar=("VARIANT", "DEVICE", "PRECISION", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(*args.probe)
        return
    if not args.default_allocator:
        steady_allocator(sys.argv)
    result, precisions = step_benchmark(f"{args.method}_step", args.device, batch=BATCH, length=LENGTH,
                                        **({"rank": RANK} if args.method == "lora" else {}))
    result["allocator"] = allocator_note()
    for precision in precisions:
        timing = time_steps(args.device, precision, args.rounds, args.method)
        if args.rss:
            peaks = {v: run_probe(__file__, v, args.device, precision, args.method) for v in ("deltatune", "peft")}
            timing["step_peak_mib"] = {v: peaks[v]["step_peak_mib"] for v in peaks}
            # the resident set may not grow at all when the allocator reuses freed blocks: no ratio then
            peft_peak = peaks["peft"]["step_peak_mib"]
            timing["memory_ratio_vs_peft"] = (round(peaks["deltatune"]["step_peak_mib"] / peft_peak, 3)
                                              if peft_peak > 0 else None)
        result[precision] = timing
    print(json.dumps(result))


if __name__ == "__main__":
    main()
