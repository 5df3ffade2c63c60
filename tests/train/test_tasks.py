"""Tasks and batching: labels and loss masks against hand-built ones, packing, dynamic padding,
truncation counts, and the length-grouped, resumable batch order."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from deltatune.errors import ConfigError
from deltatune.train import tasks
from deltatune.train.batching import epoch_batches, eval_batches, length_pieces, shard
from deltatune.train.recipe import DataSpec


@pytest.fixture(scope="module")
def bert_tok(toy_models):
    return AutoTokenizer.from_pretrained(toy_models["bert"])


@pytest.fixture(scope="module")
def chat_tok(toy_models):
    return AutoTokenizer.from_pretrained(toy_models["llama-chat"])


def test_instruction_loss_covers_only_the_response(bert_tok):
    task = tasks.CausalLM(DataSpec(format="instruction", max_length=256), bert_tok)
    row = {"instruction": "Name a colour.", "input": "", "output": "blue"}
    enc = task.encode([row], "data")
    (feature,) = enc.features
    prompt = tasks.ALPACA_PROMPT.format(extra="", instruction="Name a colour.", input="")
    prompt_ids = bert_tok(prompt)["input_ids"]  # with [CLS] ... [SEP], as the model sees it
    response_ids = bert_tok("blue" + bert_tok.eos_token if bert_tok.eos_token else "blue",
                            add_special_tokens=False)["input_ids"]
    assert feature["input_ids"] == prompt_ids + response_ids
    assert feature["labels"] == [-100] * len(prompt_ids) + response_ids


def test_instruction_uses_the_chat_template_where_there_is_one(chat_tok):
    task = tasks.CausalLM(DataSpec(format="auto", max_length=256), chat_tok)
    enc = task.encode([{"instruction": "Say hi", "input": "to Bob", "output": "hi Bob"}], "data")
    (feature,) = enc.features
    prompt = "<user> Say hi\n\nto Bob [SEP] <assistant> "
    prompt_ids = chat_tok(prompt, add_special_tokens=False)["input_ids"]
    response_ids = chat_tok("hi Bob [SEP] ", add_special_tokens=False)["input_ids"]
    assert feature["input_ids"] == prompt_ids + response_ids
    assert feature["labels"] == [-100] * len(prompt_ids) + response_ids


def test_instruction_truncation_is_counted_and_prompt_only_examples_dropped(bert_tok):
    task = tasks.CausalLM(DataSpec(format="instruction", max_length=40), bert_tok)
    rows = [{"instruction": "short", "input": "", "output": "word " * 50},
            {"instruction": "long " * 60, "input": "", "output": "x"},
            {"instruction": "ok", "input": "", "output": "fine"}]
    enc = task.encode(rows, "data")
    assert enc.truncated == 2 and enc.dropped == 1 and len(enc) == 2
    assert all(len(f["input_ids"]) <= 40 for f in enc.features)
    with pytest.warns(UserWarning, match="2 of 3 train examples were longer than data.max_length=40"):
        tasks.warn_truncation(enc, "train", 40)


def test_plain_text_is_packed_into_full_blocks(bert_tok):
    text = "to be or not to be that is the question\n" * 20
    task = tasks.CausalLM(DataSpec(format="text", block_size=16), bert_tok)
    enc = task.encode(text, "data")
    stream = [i for chunk in [bert_tok("".join(text.splitlines(keepends=True)[:64]), add_special_tokens=False)["input_ids"]]
              for i in chunk]
    assert len(enc) == len(stream) // 16
    assert [i for f in enc.features for i in f["input_ids"]] == stream[:len(enc) * 16]
    assert all(f["labels"] == f["input_ids"] for f in enc.features)
    batch = task.collate(enc.features[:2])
    assert task.loss_units(batch) == 2 * 15  # the model predicts tokens 1..15 of each block


def test_seq_cls_labels_padding_and_units(bert_tok):
    task = tasks.SeqCls(DataSpec(text="t", label="y", max_length=8), bert_tok)
    rows = [{"t": "good", "y": "pos"}, {"t": "bad movie indeed, very very very bad", "y": "neg"}]
    task.fit_labels(rows)
    assert task.labels == ["neg", "pos"]
    assert task.model_kwargs()["num_labels"] == 2
    enc = task.encode(rows, "data")
    assert enc.truncated == 1 and [f["labels"] for f in enc.features] == [1, 0]
    batch = task.collate(enc.features)
    assert batch["input_ids"].shape == (2, 8) and batch["attention_mask"][0].sum() == 3
    assert task.loss_units(batch) == 2
    with pytest.raises(ConfigError, match="label 'meh' is not among the training labels"):
        task.encode([{"t": "x", "y": "meh"}], "eval data")
    with pytest.raises(ConfigError, match="has no field 't'; its fields are text"):
        task.encode([{"text": "x"}], "eval data")


def test_numeric_labels_from_tsv_strings(bert_tok):
    task = tasks.SeqCls(DataSpec(text="t", label="y"), bert_tok)
    task.fit_labels([{"y": "0"}, {"y": "2"}])
    assert task.labels == ["0", "1", "2"]
    assert [f["labels"] for f in task.encode([{"t": "a", "y": "2"}, {"t": "b", "y": 1}], "d").features] == [2, 1]


def test_token_classification_tags_the_first_subword_only(bert_tok):
    task = tasks.TokenCls(DataSpec(text="tokens", label="tags"), bert_tok)
    rows = [{"tokens": ["Xylophonist", "is", "big"], "tags": ["LOC", "O", "O"]}]
    task.fit_labels(rows)
    assert task.labels == ["LOC", "O"]
    (feature,) = task.encode(rows, "data").features
    pieces = [bert_tok(w, add_special_tokens=False)["input_ids"] for w in rows[0]["tokens"]]
    expected = [-100]
    for piece, tag in zip(pieces, [0, 1, 1]):
        expected += [tag] + [-100] * (len(piece) - 1)
    expected += [-100]
    assert len(pieces[0]) > 1 and feature["labels"] == expected


def test_length_grouped_batches_are_a_seeded_permutation():
    lengths = [(i * 37) % 50 + 1 for i in range(1000)]
    batches = epoch_batches(lengths, 8, seed=3, epoch=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert epoch_batches(lengths, 8, seed=3, epoch=0) == batches  # a resumed run rebuilds it
    assert epoch_batches(lengths, 8, seed=3, epoch=1) != batches
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest batch first

    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)
    assert padding(batches) < padding(epoch_batches(lengths, 8, seed=3, epoch=0, group_by_length=False)) / 5


def _cheapest_cut(lengths: list[int], piece_cost: int) -> int:
    """Brute force: every way to cut the lengths (sorted, longest first) into consecutive pieces."""
    s = sorted(lengths, reverse=True)
    best = None
    for mask in range(2 ** (len(s) - 1)):
        cuts = [0] + [k + 1 for k in range(len(s) - 1) if mask >> k & 1] + [len(s)]
        cost = sum((b - a) * s[a] + piece_cost for a, b in zip(cuts, cuts[1:]))
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("piece_cost", [0, 7, 40, 1000])
def test_length_pieces_cut_where_padding_plus_passes_cost_least(piece_cost):
    g = torch.Generator().manual_seed(piece_cost)
    for _ in range(20):
        n = int(torch.randint(1, 11, (1,), generator=g))
        lengths = torch.randint(1, 60, (n + 5,), generator=g).tolist()
        batch = torch.randperm(n + 5, generator=g)[:n].tolist()
        pieces = length_pieces(batch, lengths, piece_cost)
        assert sorted(i for p in pieces for i in p) == sorted(batch)  # a partition of the batch
        cost = sum(len(p) * max(lengths[i] for i in p) + piece_cost for p in pieces)
        assert cost == _cheapest_cut([lengths[i] for i in batch], piece_cost)
    assert length_pieces([0, 1, 2], [9, 9, 9], piece_cost=0) == [[0, 1, 2]]  # equal lengths stay whole
    assert len(length_pieces(list(range(32)), [60] + [8] * 31)) == 2  # one long example: cut it off


def test_global_batches_split_evenly_between_processes():
    batches = epoch_batches(list(range(10)), 4, seed=0, epoch=0, group_by_length=False, drop_below=2)
    assert [len(b) for b in batches] == [4, 4, 2]
    for b in batches:
        parts = [shard(b, r, 2) for r in range(2)]
        assert sorted(parts[0] + parts[1]) == sorted(b) and len(parts[0]) == len(parts[1])
    assert epoch_batches(list(range(9)), 4, seed=0, epoch=0, drop_below=2)[-1].__len__() >= 2
    assert sorted(i for b in eval_batches([3, 1, 2], 2) for i in b) == [0, 1, 2]


def test_seq2seq_targets_become_labels(bert_tok):
    task = tasks.Seq2Seq(DataSpec(text="src", label="tgt"), bert_tok)
    (feature,) = task.encode([{"src": "hello there", "tgt": "general kenobi"}], "d").features
    assert feature["labels"] == bert_tok(text_target="general kenobi")["input_ids"]
    batch = task.collate([feature, {**feature, "labels": feature["labels"][:2]}])
    assert batch["labels"][1].tolist()[-1] == -100  # padded labels are ignored by the loss
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])


def test_a_tsv_line_broken_in_two_is_left_out_with_a_note(bert_tok, tmp_path):
    # as in the SUBJ file: one sentence lost its tab and label to a line break
    from deltatune.train.data import read_rows

    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\na fine film\t1\nthe plot is thin \nand the acting worse\t0\ndull\t0\n")
    rows = read_rows(path)
    task = tasks.SeqCls(DataSpec(text="sentence"), bert_tok)
    task.fit_labels(rows)
    assert task.labels == ["0", "1"]  # no third class made of the broken line
    enc = task.encode(rows, "train")
    assert [f["labels"] for f in enc.features] == [1, 0, 0] and enc.unlabelled == 1
    with pytest.warns(UserWarning, match="1 train rows were left out: their label field is empty"):
        tasks.warn_truncation(enc, "train", 128)
