"""LoRA round trip on the embedded MiniLM: attach, report, save, reload, merge, and compare outputs.

Run with `make demo` (or `python examples/lora_roundtrip.py` inside the venv).
"""

from __future__ import annotations

import tempfile

import torch
import transformers

import deltatune as dt

transformers.logging.set_verbosity_error()  # the fresh classifier head is expected; keep the demo quiet


def main() -> None:
    torch.manual_seed(0)
    tokenizer = dt.load_tokenizer("minilm")
    batch = tokenizer(["a gripping, beautifully acted film", "dull and far too long"],
                      padding=True, return_tensors="pt")

    base = dt.load_model("minilm", num_labels=2).eval()
    with torch.no_grad():
        base_logits = base(**batch).logits.clone()

    # init="random" gives B a non-zero start, so the adapter visibly changes the output
    model = dt.attach(base, dt.LoraConfig(r=8, alpha=16, targets=["q", "v"], init="random")).eval()
    print(model.report())
    with torch.no_grad():
        adapted = model(**batch).logits.clone()
        with model.disabled():
            disabled = model(**batch).logits.clone()

    with tempfile.TemporaryDirectory() as folder:
        model.save(folder)
        reloaded = dt.load(dt.load_model("minilm", num_labels=2).eval(), folder, name="reloaded")
        with torch.no_grad():
            reloaded_logits = reloaded(**batch).logits

    model.merge()
    with torch.no_grad():
        merged = model(**batch).logits
    plain = model.merge_and_unload()
    with torch.no_grad():
        unloaded = plain(**batch).logits

    def gap(a: torch.Tensor, b: torch.Tensor) -> str:
        return f"{(a - b).abs().max().item():.2e}"

    print()
    print(f"adapter changes the logits by   {gap(adapted, base_logits)}")
    print(f"disabled vs base model          {gap(disabled, base_logits)}")
    print(f"saved -> reloaded vs adapted    {gap(reloaded_logits, adapted)}")
    print(f"merged vs unmerged              {gap(merged, adapted)}")
    print(f"merge_and_unload vs unmerged    {gap(unloaded, adapted)}  ({type(plain).__name__})")
    ok = (torch.allclose(disabled, base_logits, atol=1e-6) and torch.allclose(reloaded_logits, adapted, atol=1e-6)
          and torch.allclose(merged, adapted, atol=1e-4) and torch.allclose(unloaded, adapted, atol=1e-4))
    print("all outputs agree" if ok else "MISMATCH")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
