"""Memory of fine-tuning the embedded SmolLM2-135M: full fine-tuning, LoRA (fp32 and bf16 base)
and QLoRA (4-bit NF4 base with double quantization) side by side in one run.

For each variant, in its own process: weight memory, peak RSS added by a training step, and the
perplexity on held-out tiny-shakespeare before and after the same short fine-tune. Also the
storage bits per quantized parameter (the QLoRA paper reports 4.127 for NF4 + double quant).
Prints a JSON line and, with --markdown FILE, writes the table.

    python benchmarks/qlora_memory.py [--steps 4] [--parallel 2] [--markdown docs/memory.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bf16_is_native, machine, peak_rss_mib, reset_peak_rss, rss_mib, run_probe  # noqa: E402

import transformers  # noqa: E402

import deltatune as dt  # noqa: E402

transformers.logging.set_verbosity_error()
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
VARIANTS = ("full", "lora-fp32", "lora-bf16", "qlora-nf4")
LENGTH, BATCH, HELD_OUT_BLOCKS = 128, 2, 8
LORA = dict(r=8, alpha=16, targets=["q", "k", "v", "o", "up", "down", "gate"])


def token_blocks(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Train blocks from the start of the text, held-out blocks from its last 10%."""
    text = DATA.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    def blocks(part: str, limit: int) -> torch.Tensor:
        ids = tokenizer(part[:limit], return_tensors="pt").input_ids[0]
        return ids[: len(ids) // LENGTH * LENGTH].view(-1, LENGTH)
    return blocks(text[:cut], 60_000), blocks(text[cut:], 8_000)[:HELD_OUT_BLOCKS]


def build(variant: str, folder: str) -> torch.nn.Module:
    """The model a variant trains, with exactly its trainable parameters."""
    dtype = torch.bfloat16 if variant == "lora-bf16" else torch.float32
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if variant == "full":
        return base
    if variant == "qlora-nf4":
        dt.prepare_for_kbit_training(dt.quantize(base, bits=4), gradient_checkpointing=False)
    return dt.attach(base, dt.LoraConfig(**LORA))


def weight_mib(model: torch.nn.Module) -> float:
    report = dt.quantization_report(model)
    return report.weight_bytes / 2**20


def perplexity(model, blocks: torch.Tensor, autocast) -> float:
    model.eval()
    with torch.no_grad(), autocast():
        losses = [model(input_ids=blocks[i:i + 4], labels=blocks[i:i + 4]).loss.float().item()
                  for i in range(0, len(blocks), 4)]
    return math.exp(sum(losses) / len(losses))


def probe(variant: str, folder: str, steps: int) -> None:
    """Child process: one variant's memory and perplexity, as a JSON line."""
    torch.set_num_threads(1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    train, held = token_blocks(tokenizer)
    rss_before_model = rss_mib()
    model = build(variant, folder)
    native = bf16_is_native("cpu")
    autocast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if variant == "lora-bf16" and native
                else contextlib.nullcontext)
    out = {"variant": variant, "weight_mib": round(weight_mib(model), 1),
           "model_rss_mib": round(rss_mib() - rss_before_model, 1)}
    if variant == "qlora-nf4":
        out["bits_per_quantized_param"] = round(dt.quantization_report(model).bits_per_quantized_param, 4)
    params = [p for p in model.parameters() if p.requires_grad]
    out["trainable"] = sum(p.numel() for p in params)
    if variant == "lora-bf16" and not native:
        out["skipped"] = "bf16 compute is emulated on this CPU (no AVX512-BF16/AMX): weights measured only"
        print(json.dumps(out))
        return
    out["ppl_before"] = round(perplexity(model, held, autocast), 2)
    optimizer = torch.optim.AdamW(params, lr=1e-5 if variant == "full" else 2e-4)
    g = torch.Generator().manual_seed(0)
    start, peak = time.perf_counter(), 0.0
    for step in range(steps):
        model.train()
        batch = train[torch.randint(0, len(train), (BATCH,), generator=g)]
        before = rss_mib()
        reset_peak_rss()
        with autocast():
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 1:  # the first step also allocates optimizer state; count it separately
            peak = max(peak, peak_rss_mib() - before)
        else:
            out["first_step_peak_mib"] = round(peak_rss_mib() - before, 1)
    out["step_peak_mib"] = round(peak, 1)
    out["s_per_step"] = round((time.perf_counter() - start) / steps, 2)
    out["ppl_after"] = round(perplexity(model, held, autocast), 2)
    print(json.dumps(out))


def markdown(result: dict) -> str:
    rows = result["variants"]
    lines = [
        "# Memory: fine-tuning SmolLM2-135M on this CPU",
        "",
        "Produced by `python benchmarks/qlora_memory.py --markdown docs/memory.md`; every variant runs in its own",
        f"process in one run. Machine: {result['machine']['cpu']} ({result['machine']['cpu_capability']}, "
        f"native bf16: {result['machine']['native_bf16']}), torch {result['machine']['torch']}.",
        f"Training step: batch {BATCH} x {LENGTH} tokens, AdamW, {result['steps']} steps; perplexity on "
        f"{HELD_OUT_BLOCKS} held-out tiny-shakespeare blocks. LoRA: r=8 on q,k,v,o,up,down,gate.",
        "",
        "| variant | trainable params | weight memory (MiB) | step peak (MiB) | first step peak (MiB) | s/step | "
        "perplexity before | after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["variant"], f"{r['trainable']:,}", f"{r['weight_mib']}"]
        if "skipped" in r:
            cells += ["-", "-", "-", "-", "-"]
        else:
            cells += [str(r["step_peak_mib"]), str(r["first_step_peak_mib"]), str(r["s_per_step"]),
                      str(r["ppl_before"]), str(r["ppl_after"])]
        lines.append("| " + " | ".join(cells) + " |")
    q = next(r for r in rows if r["variant"] == "qlora-nf4")
    lines += ["", f"QLoRA storage: **{q['bits_per_quantized_param']} bits per quantized parameter** "
                  "(NF4 data + 8-bit block scales + fp32 second-level scales; the QLoRA paper reports 4.127).",
              "Weight memory counts parameters and quantized storage; the output head stays in full precision.",
              "QLoRA's perplexity before training is that of the 4-bit base: NF4 rounding of every weight costs",
              "perplexity, which the short fine-tune partly recovers. s/step is wall time on a shared machine;",
              "compare the rows of one run only. Step peak is the resident memory a training step adds on top",
              "of the loaded model (the first step also allocates the optimizer state)."]
    lines += [f"- {r['variant']}: {r['skipped']}" for r in rows if "skipped" in r]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--markdown", help="write the table to this Markdown file")
    parser.add_argument("--parallel", type=int, default=2, help="probe processes at a time")
    parser.add_argument("--probe", nargs=3, metavar=("VARIANT", "FOLDER", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args.probe[0], args.probe[1], int(args.probe[2]))
        return
    if not DATA.is_file():
        raise SystemExit(f"tiny-shakespeare not found at {DATA}")
    with tempfile.TemporaryDirectory() as folder:
        # the GGUF file takes ~15 s to dequantize: do it once, then every probe loads safetensors
        dt.load_model("smollm2", auto_class="AutoModelForCausalLM").save_pretrained(folder)
        dt.load_tokenizer("smollm2").save_pretrained(folder)
        # the probes are separate processes (peak RSS is per process), so two run at a time,
        # each on one torch thread: the whole benchmark stays within a couple of minutes
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            variants = list(pool.map(lambda v: run_probe(__file__, v, folder, str(args.steps)), VARIANTS))
    result = {"benchmark": "qlora_memory", "steps": args.steps, "machine": machine(), "variants": variants}
    result["bits_per_quantized_param"] = next(v for v in variants if v["variant"] == "qlora-nf4").get(
        "bits_per_quantized_param")
    full = next(v for v in variants if v["variant"] == "full")
    result["ratios_vs_full"] = {v["variant"]: {"weight": round(v["weight_mib"] / full["weight_mib"], 3),
                                               **({"step_peak": round(v["step_peak_mib"] / full["step_peak_mib"], 3)}
                                                  if "step_peak_mib" in v else {})}
                                for v in variants}
    print(json.dumps(result))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown(result))


if __name__ == "__main__":
    main()
