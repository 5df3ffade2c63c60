"""Prompt tuning (Lester et al. 2021): the method contract, parameter counts, HF PEFT parity both
ways, greedy generation after a reload, init from text, prompt + LoRA together, and a short
real training run. The helpers at the top are shared with the P-tuning and prefix tests."""

from __future__ import annotations

import json
from dataclasses import replace

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.methods.prompt import PromptTuningConfig
from tests.methods import contract
from tests.toy_models import build_bert

N = 3  # virtual tokens in the toy configs
WIDTH = 32  # the toys' hidden size
HEAD = WIDTH * 3 + 3  # the BERT toy's classifier, trained as a copy next to the adapter
PEFT_TASK = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM",
             "bert-encoder": "FEATURE_EXTRACTION"}


# A bare BertModel: PEFT keeps a sequence-classification head under a key prefix deltatune's core
# does not read yet, so encoder parity is checked without a head (FEATURE_EXTRACTION).
BERT_ENCODER = replace(contract.TOYS["bert"], name="bert-encoder", build=lambda: build_bert().bert,
                       peft_task="FEATURE_EXTRACTION", make_labels=None)
PARITY_TOYS = {"bert-encoder": BERT_ENCODER, **{k: contract.TOYS[k] for k in ("gpt2", "llama", "t5")}}
GENERATING_TOYS = ("gpt2", "llama", "t5")


def outputs(model, inputs: dict) -> dict:
    """The comparable outputs of one forward: loss, logits, hidden state, pooled output."""
    with torch.no_grad():
        out = model(**inputs)
    return {k: out[k].clone() for k in ("loss", "logits", "last_hidden_state", "pooler_output")
            if out.get(k) is not None}


def assert_same_outputs(ours: dict, theirs: dict, virtual: int = 0, atol: float = 1e-6) -> None:
    """``ours == theirs``; PEFT's sequence outputs may carry ``virtual`` leading positions that
    deltatune cuts off (its real-token positions must then match exactly)."""
    assert set(ours) == set(theirs), (sorted(ours), sorted(theirs))
    for key, value in ours.items():
        other = theirs[key]
        if virtual and key in ("logits", "last_hidden_state"):
            assert other.shape[1] == value.shape[1] + virtual, (key, other.shape, value.shape)
            other = other[:, virtual:]
        torch.testing.assert_close(value, other, atol=atol, rtol=0, msg=f"{key} differs")


def greedy(model, toy: contract.Toy, tokens: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ``(sequences, scores)``: the tokens and, stacked, each step's next-token logits."""
    inputs = toy.loss_batch()
    with torch.no_grad():
        out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             max_new_tokens=tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores, dim=1)


def peft_file_loads_in_deltatune(toy: contract.Toy, peft_config, tmp_path, virtual: int = 0) -> dt.AdaptedModel:
    """A PEFT-trained-from-scratch adapter, saved by PEFT, gives PEFT's outputs when deltatune loads it."""
    inputs = toy.loss_batch()
    theirs = peft.get_peft_model(toy.base(), peft_config).eval()
    theirs.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(toy.base(), tmp_path).eval()
    ours = dt.load(toy.base(), tmp_path).eval()
    assert_same_outputs(outputs(ours, inputs), outputs(reloaded, inputs), virtual)
    # the live PEFT model recomputes an encoder's output; equal up to float rounding
    assert_same_outputs(outputs(ours, inputs), outputs(theirs, inputs), virtual, atol=1e-5)
    return ours


def deltatune_file_loads_in_peft(toy: contract.Toy, config: dt.MethodConfig, tmp_path, virtual: int = 0) -> None:
    """A (perturbed) deltatune adapter, saved by deltatune, gives the same outputs in PEFT."""
    inputs = toy.loss_batch()
    ours = contract.perturbed(dt.attach(toy.base(), config))
    expected = outputs(ours, inputs)
    ours.save(tmp_path)
    theirs = peft.PeftModel.from_pretrained(toy.base(), tmp_path).eval()
    assert_same_outputs(expected, outputs(theirs, inputs), virtual)


def teacher_forced_scores(model, toy: contract.Toy, sequences: torch.Tensor, steps: int) -> torch.Tensor:
    """The next-token logits of the last ``steps`` positions of ``sequences`` (a greedy output for
    ``toy``'s prompt), from one forward over the whole sequence: no cache involved."""
    inputs = toy.loss_batch()
    with torch.no_grad():
        if getattr(toy.base().config, "is_encoder_decoder", False):
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        decoder_input_ids=sequences[:, :-1])
        else:
            mask = torch.ones_like(sequences[:, :-1])
            out = model(input_ids=sequences[:, :-1], attention_mask=mask)
    return out.logits[:, -steps:]


def generates_the_same_after_reload(toy: contract.Toy, config: dt.MethodConfig, tmp_path) -> torch.Tensor:
    """Greedy generation of a (perturbed) adapter is the same after a reload (the same tokens, and
    the same logits at every step, which the adapter changes), and every step's logits are those
    PEFT computes for the same adapter file and sequence. PEFT is asked for one forward over the
    whole sequence, not for its own generate: with transformers 5.24, PEFT 0.21.2's generate goes
    wrong after the first step for decoder-only models and for T5 prefix tuning (its scores then
    differ from its own forward over the same tokens by 0.05 to 2)."""
    model = contract.perturbed(dt.attach(toy.base(), config))
    tokens, scores = greedy(model, toy)
    model.save(tmp_path)
    reloaded_tokens, reloaded_scores = greedy(dt.load(toy.base(), tmp_path), toy)
    torch.testing.assert_close(reloaded_tokens, tokens, atol=0, rtol=0)
    torch.testing.assert_close(reloaded_scores, scores, atol=1e-5, rtol=0)
    theirs = peft.PeftModel.from_pretrained(toy.base(), tmp_path).eval()
    steps = scores.shape[1]
    torch.testing.assert_close(teacher_forced_scores(theirs, toy, tokens, steps), scores, atol=1e-5, rtol=0)
    with model.disabled():
        base_scores = greedy(model, toy)[1]  # may stop at EOS after a different number of steps
        assert base_scores.shape != scores.shape or not torch.allclose(base_scores, scores, atol=1e-4), \
            "the adapter does not act in generate"
    return tokens


def config_for(toy_name: str, config: dt.MethodConfig) -> dt.MethodConfig:
    return config.replace(task_type="FEATURE_EXTRACTION") if toy_name == "bert-encoder" else config


# --- prompt tuning ----------------------------------------------------------------------------

CONFIG = PromptTuningConfig(num_virtual_tokens=N)


@pytest.mark.parametrize("toy", contract.TOYS.values(), ids=contract.TOYS.keys())
def test_prompt_tuning_contract(toy, tmp_path):
    contract.check_only_adapter_parameters_train(toy, CONFIG)
    contract.check_changes_and_disables(toy, CONFIG)
    tensors = contract.check_save_load(toy, CONFIG, tmp_path)
    assert tuple(tensors["prompt_embeddings"].shape) == (N, WIDTH)
    contract.check_remove_restores_base(toy, CONFIG)
    contract.check_mixed_batch(toy, CONFIG, refused="cannot share a mixed batch")


@pytest.mark.parametrize("toy", contract.TOYS.values(), ids=contract.TOYS.keys())
def test_trainable_count_is_the_prompt_table_and_matches_peft(toy):
    head = HEAD if toy.name == "bert" else 0
    contract.check_trainable_count(toy, CONFIG, N * WIDTH + head)
    theirs = peft.get_peft_model(toy.base(), peft.PromptTuningConfig(
        task_type=PEFT_TASK[toy.name], num_virtual_tokens=N, num_transformer_submodules=1))
    assert theirs.get_nb_trainable_parameters()[0] == N * WIDTH + head


def test_peft_two_submodule_layout_on_t5_is_reproduced():
    """PEFT's default for encoder-decoder models allocates a second, never-read block of rows."""
    toy = contract.TOYS["t5"]
    theirs = peft.get_peft_model(toy.base(), peft.PromptTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N))
    assert theirs.get_nb_trainable_parameters()[0] == 2 * N * WIDTH
    contract.check_trainable_count(toy, PromptTuningConfig(num_virtual_tokens=N, num_transformer_submodules=2),
                                   2 * N * WIDTH)


def test_merge_is_refused():
    model = dt.attach(contract.TOYS["gpt2"].base(), CONFIG)
    with pytest.raises(dt.AdapterError, match="cannot be merged"):
        model.merge()


@pytest.mark.parametrize("name", PARITY_TOYS)
def test_peft_prompt_tuning_file_loads_with_identical_outputs(name, tmp_path):
    toy = PARITY_TOYS[name]
    virtual = N if name in ("gpt2", "llama", "bert-encoder") else 0
    peft_file_loads_in_deltatune(toy, peft.PromptTuningConfig(task_type=PEFT_TASK[name], num_virtual_tokens=N),
                                 tmp_path, virtual)


@pytest.mark.parametrize("name", PARITY_TOYS)
def test_deltatune_prompt_tuning_file_loads_in_peft_with_identical_outputs(name, tmp_path):
    virtual = N if name in ("gpt2", "llama", "bert-encoder") else 0
    deltatune_file_loads_in_peft(PARITY_TOYS[name], config_for(name, CONFIG), tmp_path, virtual)


@pytest.mark.parametrize("name", GENERATING_TOYS)
def test_generate_same_tokens_after_reload_and_in_peft(name, tmp_path):
    toy = contract.TOYS[name]
    tokens = generates_the_same_after_reload(toy, CONFIG, tmp_path)
    if name != "t5":  # decoder-only: the output starts with the prompt's real tokens
        torch.testing.assert_close(tokens[:, :7], toy.loss_batch()["input_ids"], atol=0, rtol=0)


def test_forward_equals_base_model_on_prepended_embeddings():
    """Independent of PEFT: the adapter is exactly the base model fed [prompt; tokens] embeddings,
    with the mask widened and the loss not counting the virtual positions."""
    toy = contract.TOYS["gpt2"]
    inputs = toy.loss_batch()
    model = contract.perturbed(dt.attach(toy.base(), CONFIG))
    prompt = model.model_adapters["default"].prompts().detach()
    base = toy.base()
    embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(inputs["input_ids"])], dim=1)
    mask = torch.cat([torch.ones(2, N, dtype=torch.long), inputs["attention_mask"]], dim=1)
    with torch.no_grad():
        reference = base(inputs_embeds=embeds, attention_mask=mask)
        ours = model(**inputs)
    torch.testing.assert_close(ours.logits, reference.logits[:, N:], atol=1e-6, rtol=0)
    # next-token loss over the real tokens, plus the first real token predicted from the last virtual one
    targets = inputs["input_ids"]
    predicting = reference.logits[:, N - 1:-1]
    expected_loss = torch.nn.functional.cross_entropy(predicting.reshape(-1, predicting.shape[-1]), targets.reshape(-1))
    torch.testing.assert_close(ours.loss, expected_loss, atol=1e-5, rtol=0)


def test_tuple_outputs_are_trimmed_too():
    toy = contract.TOYS["llama"]
    model = contract.perturbed(dt.attach(toy.base(), CONFIG))
    inputs = {k: v for k, v in toy.loss_batch().items() if k != "labels"}
    with torch.no_grad():
        as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], contract.logits(model, inputs), atol=0, rtol=0)


def test_saved_config_has_peft_names_and_the_model_sizes(tmp_path):
    model = dt.attach(contract.TOYS["llama"].base(), PromptTuningConfig(
        num_virtual_tokens=N, init="sample_vocab"))
    model.save(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PROMPT_TUNING" and saved["prompt_tuning_init"] == "SAMPLE_VOCAB"
    assert (saved["num_virtual_tokens"], saved["token_dim"], saved["num_layers"], saved["num_attention_heads"],
            saved["num_transformer_submodules"]) == (N, WIDTH, 4, 4, 1)
    again = PromptTuningConfig.from_dict(saved)
    assert again.init == "sample_vocab" and again.token_dim == WIDTH


def test_sample_vocab_init_rows_are_word_embeddings():
    base = contract.TOYS["gpt2"].base()
    model = dt.attach(base, PromptTuningConfig(num_virtual_tokens=5, init="sample_vocab"))
    table = model.model_adapters["default"].table().detach()
    vocab = base.get_input_embeddings().weight
    for row in table:
        assert (vocab - row).abs().amax(dim=1).min() == 0, "a row is not one of the model's word embeddings"


@pytest.mark.parametrize("bad, match", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ({"init": "glove"}, "init must be one of"),
    ({"init": "text", "tokenizer_name_or_path": "minilm"}, "init_text"),
    ({"init": "text", "init_text": "hello"}, "tokenizer_name_or_path"),
    ({"tokenizer_kwargs": {"use_fast": True}}, "only apply with init='text'"),
    ({"num_transformer_submodules": 3}, "num_transformer_submodules"),
    ({"num_transformer_submodules": True}, "num_transformer_submodules"),
    ({"token_dim": 0}, "token_dim"),
])
def test_invalid_configs_are_refused(bad, match):
    with pytest.raises(dt.ConfigError, match=match):
        PromptTuningConfig(**bad)


def test_adapter_for_another_width_is_refused():
    with pytest.raises(dt.ConfigError, match="token_dim=64 but this model has 32"):
        dt.attach(contract.TOYS["gpt2"].base(), PromptTuningConfig(num_virtual_tokens=N, token_dim=64))


# --- init from text (the embedded MiniLM and its tokenizer) ---------------------------------------

@pytest.fixture(scope="module")
def minilm():
    return dt.load_model("minilm", num_labels=2).eval(), dt.load_tokenizer("minilm")


@pytest.mark.parametrize("tokens", [10, 2])
def test_text_init_is_the_models_embeddings_of_the_text(minilm, tokens):
    base, tokenizer = minilm
    text = "a great movie"
    model = dt.attach(base, PromptTuningConfig(num_virtual_tokens=tokens, init="text", init_text=text,
                                               tokenizer_name_or_path="minilm"))
    try:
        ids = tokenizer(text)["input_ids"]  # [CLS] a great movie [SEP]
        wanted = (ids * tokens)[:tokens]  # repeated to fill, or cut
        table = model.model_adapters["default"].table().detach()
        torch.testing.assert_close(table, base.get_input_embeddings().weight[wanted].detach(), atol=0, rtol=0)
        # PEFT's own text init, from the same tokenizer folder, agrees
        from peft.tuners.prompt_tuning import PromptEmbedding
        theirs = PromptEmbedding(peft.PromptTuningConfig(
            task_type="SEQ_CLS", num_virtual_tokens=tokens, token_dim=base.config.hidden_size,
            num_transformer_submodules=1, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
            tokenizer_name_or_path=dt.resolve_model("minilm").path), base.get_input_embeddings())
        torch.testing.assert_close(table, theirs.embedding.weight.detach(), atol=0, rtol=0)
    finally:
        model.remove("default")


def test_missing_tokenizer_fails_on_use_but_a_saved_adapter_still_loads(tmp_path):
    toy = contract.TOYS["gpt2"]
    missing = str(tmp_path / "no-such-tokenizer")
    text_config = PromptTuningConfig(num_virtual_tokens=N, init="text", init_text="hi", tokenizer_name_or_path=missing)
    model = dt.attach(toy.base(), text_config)
    with pytest.raises(dt.ConfigError, match="cannot load the tokenizer"):
        model(**toy.loss_batch())
    with pytest.raises(dt.ConfigError, match="cannot load the tokenizer"):
        model.save(tmp_path / "never")
    # a file whose config names an unavailable tokenizer (PEFT made it elsewhere) loads all the same
    trained = contract.perturbed(dt.attach(toy.base(), CONFIG))
    folder = tmp_path / "adapter"
    trained.save(folder)
    saved = json.loads((folder / "adapter_config.json").read_text())
    saved.update(prompt_tuning_init="TEXT", prompt_tuning_init_text="hi", tokenizer_name_or_path=missing)
    (folder / "adapter_config.json").write_text(json.dumps(saved))
    loaded = dt.load(toy.base(), folder)
    torch.testing.assert_close(contract.logits(loaded, toy.loss_batch()), contract.logits(trained, toy.loss_batch()),
                               atol=0, rtol=0)


@pytest.mark.parametrize("config, kind, layout", [
    (CONFIG, "prompt", "num_virtual_tokens x token_dim"),
    (dt.PTuningConfig(num_virtual_tokens=N), "prompt", "num_virtual_tokens x token_dim"),
    (dt.PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True), "prefix",
     "num_virtual_tokens x num_layers*2*token_dim"),
], ids=["prompt", "p_tuning", "prefix"])
def test_a_file_whose_table_does_not_fit_is_refused_naming_what_fits(config, kind, layout, tmp_path):
    toy = contract.TOYS["gpt2"]
    dt.attach(toy.base(), config).save(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    table = load_file(weights)["prompt_embeddings"]
    rows, width = table.shape
    save_file({"prompt_embeddings": torch.zeros(rows + 1, width)}, weights)
    with pytest.raises(dt.AdapterFileError) as caught:
        dt.load(toy.base(), tmp_path)
    assert str(caught.value) == (f"prompt_embeddings has shape ({rows + 1}, {width}) in the file but the model "
                                 f"expects ({rows}, {width}) ({layout}): another base model?")
    save_file({"prompt_embeddings": table, "prompt_encoder": table.clone()}, weights)
    with pytest.raises(dt.AdapterFileError) as caught:
        dt.load(toy.base(), tmp_path)
    assert str(caught.value) == (f"a {kind} adapter file holds one tensor, 'prompt_embeddings'; this one has "
                                 f"['prompt_embeddings', 'prompt_encoder']")



@pytest.mark.parametrize("config", [dt.PTuningConfig(num_virtual_tokens=N),
                                    dt.PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True)],
                         ids=["p_tuning", "prefix"])
def test_a_table_that_does_not_fit_leaves_the_encoder_in_place(config):
    model = dt.attach(contract.TOYS["gpt2"].base(), config)
    adapter = model.model_adapters["default"]
    encoder, table = adapter.source, adapter.file_state()["prompt_embeddings"]
    with pytest.raises(dt.AdapterFileError, match="another base model"):
        adapter.load_file_state({"prompt_embeddings": torch.zeros(table.shape[0] + 1, table.shape[1])})
    assert adapter.source is encoder  # still trainable through its encoder, not folded into a table

# --- with LoRA --------------------------------------------------------------------------------

def test_prompt_and_lora_active_together(tmp_path):
    toy = contract.TOYS["gpt2"]
    inputs = toy.loss_batch()
    model = dt.attach(toy.base(), CONFIG, name="prompt_adapter")
    model.add(dt.LoraConfig(r=4, alpha=8, targets=["q", "v"], init="random"), "lora_adapter")
    model.use(["prompt_adapter", "lora_adapter"])
    contract.perturbed(model)
    both = contract.logits(model, inputs)

    # reference: the LoRA-only model fed the prompt by hand
    prompt = model.model_adapters["prompt_adapter"].prompts().detach()
    model.use("lora_adapter")
    embeds = torch.cat([prompt.expand(2, -1, -1), model.get_input_embeddings()(inputs["input_ids"])], dim=1)
    mask = torch.cat([torch.ones(2, N, dtype=torch.long), inputs["attention_mask"]], dim=1)
    with torch.no_grad():
        by_hand = model(inputs_embeds=embeds, attention_mask=mask).logits[:, N:]
    torch.testing.assert_close(both, by_hand, atol=1e-6, rtol=0)
    lora_only = contract.logits(model, inputs)
    model.use("prompt_adapter")
    prompt_only = contract.logits(model, inputs)
    assert not torch.allclose(both, lora_only, atol=1e-4) and not torch.allclose(both, prompt_only, atol=1e-4)

    # both train together
    model.use(["prompt_adapter", "lora_adapter"])
    model.train()
    model(**inputs).loss.backward()
    prompt_param = model.model_adapters["prompt_adapter"].source.weight
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    assert prompt_param.grad is not None and all(p.grad is not None for p in lora_params)

    # each saved on its own, both loaded onto a fresh base: the same combined output
    model.save(tmp_path / "p", adapter="prompt_adapter")
    model.save(tmp_path / "l", adapter="lora_adapter")
    fresh = dt.load(toy.base(), tmp_path / "p", name="prompt_adapter")
    fresh.load(tmp_path / "l", name="lora_adapter")
    fresh.use(["prompt_adapter", "lora_adapter"])
    torch.testing.assert_close(contract.logits(fresh, inputs), both, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_prompt_tuning_learns_sst2():
    from tests.methods.short_training import train_briefly

    run = train_briefly(PromptTuningConfig(num_virtual_tokens=20), steps=60, lr=3e-2)
    assert run.trainable == 20 * 384 + (384 * 2 + 2), run  # the prompt table + the classifier copy
    assert run.accuracy_after > run.accuracy_before + 0.05, run  # the slowest learner of the methods
