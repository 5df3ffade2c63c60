"""deltatune models in the real ``transformers.Trainer`` and TRL's ``SFTTrainer``: default
arguments train, checkpoints are adapter folders that deltatune and ``peft`` load with equal
outputs, resuming continues the same run, gradient checkpointing gives the same gradients."""

from __future__ import annotations

import inspect
from pathlib import Path

import datasets
import peft
import pytest
import torch
import transformers

import deltatune as dt
from deltatune.train.hf_trainer import AdapterTrainer, adapter_trainer
from tests.train.conftest import sentiment_rows

STEPS, BATCH = 4, 8


def _args(out: Path, **changes) -> transformers.TrainingArguments:
    options = dict(max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=1e-2, report_to=[],
                   use_cpu=True, save_steps=2, logging_steps=1, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    return transformers.TrainingArguments(str(out), **{**options, **changes})


@pytest.fixture(scope="module")
def tokenizer():
    return dt.load_tokenizer("minilm")


@pytest.fixture(scope="module")
def sentiment(tokenizer):
    """Tokenized rows that keep their text column: Trainer must drop it by the forward's signature."""
    rows = sentiment_rows(48, seed=3)
    data = datasets.Dataset.from_list(rows)
    return data.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=32), batched=True)


def _lora_model(folder: str):
    torch.manual_seed(0)
    base = dt.load_model(folder, num_labels=2, quiet=True)
    return dt.attach(base, dt.LoraConfig(r=4, alpha=8, targets=["q", "v"]))


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["a lovely film", "dull and boring plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_forward_shows_the_base_models_signature(toy_models):
    model = _lora_model(toy_models["bert-nodrop"])
    shown = list(inspect.signature(model.forward).parameters)
    assert "input_ids" in shown and "adapter_names" in shown
    assert [p for p in shown if p != "adapter_names"] == list(inspect.signature(model.base_model.forward).parameters)


def test_plain_trainer_with_default_arguments_trains_minilm(sentiment, tokenizer, tmp_path):
    model = dt.attach(dt.load_model("minilm", num_labels=2, quiet=True), dt.LoraConfig(r=4, targets=["q", "v"]))
    before = _lora_state(model)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, max_steps=2, save_strategy="no"),
                                   train_dataset=sentiment, processing_class=tokenizer)
    trainer.train()  # default remove_unused_columns=True: keeps input_ids, drops the text column
    after = _lora_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)


def test_checkpoints_and_save_model_are_adapter_folders_peft_loads(toy_models, sentiment, tokenizer, tmp_path):
    model = _lora_model(toy_models["bert-nodrop"])
    trainer = AdapterTrainer(model=model, args=_args(tmp_path), train_dataset=sentiment, eval_dataset=sentiment,
                             processing_class=tokenizer)
    trainer.train()
    assert "eval_loss" in trainer.evaluate()  # label names come from the base model's class
    trainer.save_model(str(tmp_path / "final"))
    expected = _logits(model, tokenizer)
    for folder in (tmp_path / "checkpoint-2", tmp_path / "checkpoint-4", tmp_path / "final"):
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        assert not (folder / "model.safetensors").exists()
    fresh = dt.load_model(toy_models["bert-nodrop"], num_labels=2, quiet=True)
    from_peft = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "final"))
    torch.testing.assert_close(_logits(from_peft, tokenizer), expected, atol=1e-5, rtol=0)
    fresh = dt.load_model(toy_models["bert-nodrop"], num_labels=2, quiet=True)
    torch.testing.assert_close(_logits(dt.load(fresh, tmp_path / "checkpoint-4"), tokenizer), expected,
                               atol=1e-6, rtol=0)


def test_resume_from_checkpoint_continues_the_same_run(toy_models, sentiment, tokenizer, tmp_path):
    straight = _lora_model(toy_models["bert-nodrop"])
    AdapterTrainer(model=straight, args=_args(tmp_path / "a"), train_dataset=sentiment,
                   processing_class=tokenizer).train()
    interrupted = _lora_model(toy_models["bert-nodrop"])
    AdapterTrainer(model=interrupted, args=_args(tmp_path / "b"), train_dataset=sentiment,
                   processing_class=tokenizer, callbacks=[_StopAfter(2)]).train()
    assert not (tmp_path / "b" / "checkpoint-4").exists()
    resumed = _lora_model(toy_models["bert-nodrop"])  # fresh weights: the checkpoint must bring them back
    trainer = AdapterTrainer(model=resumed, args=_args(tmp_path / "b"), train_dataset=sentiment,
                             processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert trainer.state.global_step == STEPS
    want, got = _lora_state(straight), _lora_state(resumed)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0)


def test_load_best_model_at_end_restores_the_best_checkpoint(toy_models, sentiment, tokenizer, tmp_path):
    model = _lora_model(toy_models["bert-nodrop"])
    args = _args(tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                 metric_for_best_model="loss", greater_is_better=True)  # "best" = the higher loss: not the end
    trainer = AdapterTrainer(model=model, args=args, train_dataset=sentiment, eval_dataset=sentiment,
                             processing_class=tokenizer)
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == "checkpoint-2"
    fresh = dt.load_model(toy_models["bert-nodrop"], num_labels=2, quiet=True)
    torch.testing.assert_close(_logits(model, tokenizer), _logits(dt.load(fresh, best), tokenizer), atol=1e-6, rtol=0)


class _StopAfter(transformers.TrainerCallback):
    """Ends training after ``steps`` steps, as an interruption would (same schedule, same data)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.steps
        return control


def test_gradient_checkpointing_trains_as_without_it(toy_models, sentiment, tokenizer, tmp_path):
    states = []
    for checkpointing in (False, True):
        model = _lora_model(toy_models["bert-nodrop"])
        AdapterTrainer(model=model, args=_args(tmp_path / str(checkpointing), max_steps=2, save_strategy="no",
                                               gradient_checkpointing=checkpointing),
                       train_dataset=sentiment, processing_class=tokenizer).train()
        states.append(_lora_state(model))
    assert any(v.abs().max() > 0 for k, v in states[1].items() if "lora_B" in k and "layer.0." in k)
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], atol=1e-6, rtol=0)


def test_sft_trainer_trains_a_causal_lm_adapter(toy_models, tmp_path):
    from trl import SFTConfig, SFTTrainer

    folder = toy_models["llama-chat"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.eos_token = "[SEP]"  # MiniLM's tokenizer (the toy's) names none; SFT appends it
    model = dt.attach(dt.load_model(folder, "AutoModelForCausalLM", quiet=True),
                      dt.LoraConfig(r=4, alpha=8, targets=["q", "v"]))
    text = datasets.Dataset.from_list([{"text": r["sentence"]} for r in sentiment_rows(16, seed=4)])
    args = SFTConfig(str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                     use_cpu=True, bf16=False, max_length=32, save_steps=3, logging_steps=1, disable_tqdm=True)
    trainer = adapter_trainer(SFTTrainer)(model=model, args=args, train_dataset=text, processing_class=tokenizer)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    batch = tokenizer(["the film was good"], return_tensors="pt")
    with torch.no_grad():
        expected = model.eval()(**batch).logits  # the fused head only answers when asked for it
        with model.disabled():
            reference = model(**batch).logits
    assert not torch.allclose(expected, reference)  # the adapter learned something
    from_peft = peft.PeftModel.from_pretrained(dt.load_model(folder, "AutoModelForCausalLM", quiet=True),
                                               str(tmp_path / "checkpoint-3"))
    with torch.no_grad():
        torch.testing.assert_close(from_peft.eval()(**batch).logits, expected, atol=1e-5, rtol=0)


def test_dpo_trainer_trains_toward_the_chosen_answers(toy_models, tmp_path):
    import copy
    import math

    from trl import DPOConfig, DPOTrainer

    folder = toy_models["llama-chat"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.eos_token = "[SEP]"
    base = dt.load_model(folder, "AutoModelForCausalLM", quiet=True)
    reference = copy.deepcopy(base).eval()  # TRL would load it again from the base's name
    model = dt.attach(base, dt.LoraConfig(r=4, alpha=8, targets=["q", "v"]))
    pairs = datasets.Dataset.from_dict({"prompt": ["the film was"] * 8, "chosen": [" good"] * 8,
                                        "rejected": [" bad"] * 8})
    args = DPOConfig(str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                     use_cpu=True, bf16=False, max_length=16, save_steps=2, logging_steps=1, disable_tqdm=True,
                     gradient_checkpointing=False)
    trainer = adapter_trainer(DPOTrainer)(model=model, ref_model=reference, args=args, train_dataset=pairs,
                                          processing_class=tokenizer)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference: -log sigmoid(0)
    assert logs[-1]["rewards/margins"] > 0
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").is_file()


def test_adapter_trainer_of_a_class_is_made_once():
    from trl import SFTTrainer
    assert adapter_trainer(SFTTrainer) is adapter_trainer(SFTTrainer)
    assert issubclass(adapter_trainer(SFTTrainer), SFTTrainer)
    assert adapter_trainer(AdapterTrainer) is AdapterTrainer


@pytest.mark.slow
def test_sft_trainer_on_the_embedded_smollm2_gguf(tmp_path):
    from trl import SFTConfig, SFTTrainer

    tokenizer = dt.load_tokenizer("smollm2")
    base = dt.load_model("smollm2", quiet=True)  # a causal LM unless told otherwise
    assert isinstance(base, transformers.LlamaForCausalLM)
    assert not base.is_quantized  # dequantized to fp32 on load: Trainer and TRL may train it
    model = dt.attach(base, dt.LoraConfig(r=4, targets=["q", "v"]))
    text = datasets.Dataset.from_list([{"text": r["sentence"]} for r in sentiment_rows(4, seed=5)])
    args = SFTConfig(str(tmp_path), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3, report_to=[],
                     use_cpu=True, bf16=False, max_length=16, save_strategy="no", disable_tqdm=True)
    trainer = adapter_trainer(SFTTrainer)(model=model, args=args, train_dataset=text, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    config = peft.PeftConfig.from_pretrained(str(tmp_path / "final"))
    assert config.peft_type == "LORA" and sorted(config.target_modules) == ["q_proj", "v_proj"]
