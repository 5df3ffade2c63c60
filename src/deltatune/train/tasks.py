"""Tasks: how rows become model inputs, how a batch is padded, what the loss counts, and which
metrics an evaluation reports. One class per task; :data:`TASKS` maps recipe names to them."""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from deltatune.errors import ConfigError
from deltatune.train.batching import eval_batches
from deltatune.train.data import column
from deltatune.train.recipe import DataSpec

IGNORE = -100  # label value the loss skips (padding, prompt tokens, later sub-words)


@dataclass
class Encoded:
    """Tokenized examples of one split, ready to batch."""

    features: list[dict]
    truncated: int = 0  #: examples cut at max_length
    dropped: int = 0    #: examples left out (nothing to learn from after truncation)
    unlabelled: int = 0  #: rows left out because their label field is empty (e.g. a broken TSV line)

    @property
    def lengths(self) -> list[int]:
        return [len(f["input_ids"]) for f in self.features]

    def __len__(self) -> int:
        return len(self.features)

    def split_off(self, fraction: float) -> tuple["Encoded", "Encoded"]:
        """``(first part, last fraction)``: a fixed train/eval split."""
        cut = len(self.features) - max(1, round(len(self.features) * fraction))
        if cut < 1:
            raise ConfigError(f"data.eval_fraction={fraction} leaves no training examples")
        return (Encoded(self.features[:cut], self.truncated, self.dropped, self.unlabelled),
                Encoded(self.features[cut:]))


def _unlabelled(value: Any) -> bool:
    # a TSV line without its label column reads as None; an empty cell as ""
    return value is None or (isinstance(value, str) and not value.strip())


def _label_ids(values: list, where: str) -> list[str]:
    """Class names in id order: integers 0..n-1 when every label is an integer, else sorted."""
    def as_int(v):
        try:
            return int(v) if not isinstance(v, bool) and float(v) == int(float(v)) else None
        except (TypeError, ValueError):
            return None
    ints = [as_int(v) for v in values]
    if values and all(i is not None for i in ints):
        if min(ints) < 0:
            raise ConfigError(f"{where}: integer labels must be 0 or more, found {min(ints)}")
        return [str(i) for i in range(max(max(ints) + 1, 2))]
    return sorted({str(v) for v in values})


class Task:
    """Base class: subclasses define encoding, collation and metrics."""

    name: ClassVar[str] = ""
    auto_class: ClassVar[str] = ""
    peft_task: ClassVar[str] = ""
    #: metric used for "best checkpoint" / early stopping unless the recipe names one
    default_metric: ClassVar[str] = "loss"
    #: what :meth:`evaluate` reports
    metrics: ClassVar[tuple[str, ...]] = ("loss", "perplexity")

    def __init__(self, spec: DataSpec, tokenizer) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:  # GPT-2, LLaMA: pad with the end-of-text token
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.padding_side = "right"
        self.labels: list[str] | None = None
        self._collator: Callable | None = None

    @classmethod
    def selection_metric(cls, best_metric: str | None) -> str:
        """The metric that picks the best checkpoint and drives early stopping: ``best_metric``
        (checked against what this task reports) or the task's default."""
        metric = best_metric or cls.default_metric
        if metric not in cls.metrics:
            raise ConfigError(f"train.best_metric {metric!r} is not an evaluation metric of {cls.name}; "
                              f"metrics: {', '.join(cls.metrics)}")
        return metric

    # --- set-up ----------------------------------------------------------------------------
    def fit_labels(self, rows: Any) -> None:
        """Learn the label set from the training rows (classification tasks)."""

    def model_kwargs(self) -> dict:
        """Extra ``from_pretrained`` arguments (``num_labels`` ...)."""
        return {}

    def encode(self, rows: Any, where: str) -> Encoded:
        raise NotImplementedError

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """Pad ``features`` to the longest in the batch (dynamic padding)."""
        if self._collator is None:
            self._collator = self.make_collator()
        return self._collator(features)

    def make_collator(self) -> Callable:
        from transformers import DataCollatorForSeq2Seq
        return DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=IGNORE, padding=True)

    def loss_units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many items the model's mean loss averages over (examples or target tokens)."""
        return int((batch["labels"] != IGNORE).sum())

    def _tokenize(self, texts: list[str], pairs: list[str] | None = None, **kw) -> tuple[dict, int]:
        limit = self.spec.max_length
        full = self.tokenizer(texts, pairs, truncation=False, **kw) if pairs else self.tokenizer(texts, truncation=False, **kw)
        truncated = sum(len(ids) > limit for ids in full["input_ids"])
        if not truncated:
            return full, 0
        cut = self.tokenizer(texts, pairs, truncation=True, max_length=limit, **kw) if pairs else \
            self.tokenizer(texts, truncation=True, max_length=limit, **kw)
        return cut, truncated

    # --- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, encoded: Encoded, batch_size: int, device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict:
        """Metrics of ``model`` on ``encoded`` (model left in eval mode)."""
        model.eval()
        state: dict = {"loss": 0.0, "units": 0}
        for idx in eval_batches(encoded.lengths, batch_size):
            batch = {k: v.to(device) for k, v in self.collate([encoded.features[i] for i in idx]).items()}
            with autocast():
                out = model(**batch)
            units = self.loss_units(batch)
            state["loss"] += float(out.loss) * units
            state["units"] += units
            self.accumulate(state, out, batch)
        return self.finish(state)

    def accumulate(self, state: dict, out, batch: dict) -> None:
        """Add one batch's predictions to ``state``."""

    def finish(self, state: dict) -> dict:
        loss = state["loss"] / max(state["units"], 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def f1_score(pred: list[int], gold: list[int], num_labels: int) -> float:
    """Binary F1 of class 1 for two labels, else the macro F1 over the labels that occur."""
    classes = [1] if num_labels == 2 else sorted(set(gold) | set(pred))
    scores = []
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


class SeqCls(Task):
    """Sequence classification: a text (or a text pair) and one label; accuracy and F1."""

    name = "seq-cls"
    auto_class = "AutoModelForSequenceClassification"
    peft_task = "SEQ_CLS"
    default_metric = "accuracy"
    metrics = ("accuracy", "f1", "loss")

    def fit_labels(self, rows: Any) -> None:
        values = [v for v in column(rows, self.spec.label, "the training data") if not _unlabelled(v)]
        self.labels = _label_ids(values, "the training data")

    def model_kwargs(self) -> dict:
        labels = self.labels or ["0", "1"]
        return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {name: i for i, name in enumerate(labels)}}

    def _label_index(self, values: list, where: str) -> list[int]:
        index = {name: i for i, name in enumerate(self.labels)}
        out = []
        for v in values:
            key = str(int(float(v))) if _is_number(v) and str(v) not in index else str(v)
            if key not in index:
                raise ConfigError(f"{where}: label {v!r} is not among the training labels {self.labels}")
            out.append(index[key])
        return out

    def encode(self, rows: Any, where: str) -> Encoded:
        if isinstance(rows, str):
            raise ConfigError(f"{where} is plain text; seq-cls needs rows with a text and a label field")
        texts = [str(t) for t in column(rows, self.spec.text, where)]
        pairs = [str(t) for t in column(rows, self.spec.text_pair, where)] if self.spec.text_pair else None
        raw_labels = column(rows, self.spec.label, where)
        keep = [i for i, v in enumerate(raw_labels) if not _unlabelled(v)]
        texts = [texts[i] for i in keep]
        pairs = [pairs[i] for i in keep] if pairs is not None else None
        labels = self._label_index([raw_labels[i] for i in keep], where)
        enc, truncated = self._tokenize(texts, pairs)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        features = [{**{k: enc[k][i] for k in keys}, "labels": labels[i]} for i in range(len(texts))]
        return Encoded(features, truncated, unlabelled=len(raw_labels) - len(keep))

    def make_collator(self) -> Callable:
        from transformers import DataCollatorWithPadding
        return DataCollatorWithPadding(self.tokenizer, padding=True)

    def loss_units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].shape[0])

    def accumulate(self, state: dict, out, batch: dict) -> None:
        state.setdefault("pred", []).extend(out.logits.argmax(-1).tolist())
        state.setdefault("gold", []).extend(batch["labels"].tolist())

    def finish(self, state: dict) -> dict:
        pred, gold = state.get("pred", []), state.get("gold", [])
        accuracy = sum(p == g for p, g in zip(pred, gold)) / max(len(gold), 1)
        return {"accuracy": accuracy, "f1": f1_score(pred, gold, len(self.labels or [0, 1])),
                "loss": state["loss"] / max(state["units"], 1)}


def _is_number(v: Any) -> bool:
    try:
        float(v)
        return not isinstance(v, bool)
    except (TypeError, ValueError):
        return False


class TokenCls(Task):
    """Token classification (tagging): a word list and one tag per word. The first sub-word of
    each word carries the tag; the others are ignored by the loss. Token accuracy and macro F1."""

    name = "token-cls"
    auto_class = "AutoModelForTokenClassification"
    peft_task = "TOKEN_CLS"
    default_metric = "accuracy"
    metrics = ("accuracy", "f1", "loss")

    @staticmethod
    def _as_list(value: Any) -> list:
        return value.split() if isinstance(value, str) else list(value)

    def fit_labels(self, rows: Any) -> None:
        tags = [t for seq in column(rows, self.spec.label, "the training data") for t in self._as_list(seq)]
        self.labels = _label_ids(tags, "the training data")

    model_kwargs = SeqCls.model_kwargs
    _label_index = SeqCls._label_index

    def encode(self, rows: Any, where: str) -> Encoded:
        if not getattr(self.tokenizer, "is_fast", False):
            raise ConfigError("token-cls needs a fast tokenizer (word alignment); this model's tokenizer is not one")
        words = [[str(w) for w in self._as_list(v)] for v in column(rows, self.spec.text, where)]
        tags = [self._label_index(self._as_list(v), where) for v in column(rows, self.spec.label, where)]
        for i, (w, t) in enumerate(zip(words, tags)):
            if len(w) != len(t):
                raise ConfigError(f"{where}, example {i}: {len(w)} words but {len(t)} tags")
        enc, truncated = self._tokenize(words, is_split_into_words=True)
        features = []
        for i in range(len(words)):
            previous, labels = None, []
            for word in enc.word_ids(i):
                labels.append(IGNORE if word is None or word == previous else tags[i][word])
                previous = word
            keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
            features.append({**{k: enc[k][i] for k in keys}, "labels": labels})
        return Encoded(features, truncated)

    def make_collator(self) -> Callable:
        from transformers import DataCollatorForTokenClassification
        return DataCollatorForTokenClassification(self.tokenizer, label_pad_token_id=IGNORE)

    def accumulate(self, state: dict, out, batch: dict) -> None:
        keep = batch["labels"] != IGNORE
        state.setdefault("pred", []).extend(out.logits.argmax(-1)[keep].tolist())
        state.setdefault("gold", []).extend(batch["labels"][keep].tolist())

    def finish(self, state: dict) -> dict:
        pred, gold = state.get("pred", []), state.get("gold", [])
        accuracy = sum(p == g for p, g in zip(pred, gold)) / max(len(gold), 1)
        return {"accuracy": accuracy, "f1": f1_score(pred, gold, 0),
                "loss": state["loss"] / max(state["units"], 1)}


ALPACA_PROMPT = ("Below is an instruction that describes a task{extra}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


class CausalLM(Task):
    """Causal language modelling, on plain text (packed into blocks of ``block_size`` tokens)
    or on instruction records ``{instruction, input, output}`` (the loss covers only the
    response; the tokenizer's chat template is used where it has one). Loss and perplexity."""

    name = "causal-lm"
    auto_class = "AutoModelForCausalLM"
    peft_task = "CAUSAL_LM"

    def loss_units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())  # the model shifts labels by one

    def encode(self, rows: Any, where: str) -> Encoded:
        fmt = self.spec.format
        if fmt == "auto":
            fmt = "instruction" if (not isinstance(rows, str) and rows and
                                    {"instruction", "output"} <= set(rows[0])) else "text"
        if fmt == "instruction":
            if isinstance(rows, str):
                raise ConfigError(f"{where} is plain text, but data.format is 'instruction'")
            return self._encode_instructions(rows, where)
        return self._encode_text(rows, where)

    def _encode_text(self, rows: Any, where: str) -> Encoded:
        tok = self.tokenizer
        if isinstance(rows, str):
            lines = rows.splitlines(keepends=True)
            docs = ["".join(lines[i:i + 64]) for i in range(0, len(lines), 64)]  # chunks, not one huge call
            separator: list[int] = []
        else:
            docs = [str(t) for t in column(rows, self.spec.text, where)]
            separator = [tok.eos_token_id] if tok.eos_token_id is not None else []
        stream: list[int] = []
        for ids in tok(docs, add_special_tokens=False)["input_ids"]:
            stream.extend(ids + separator)
        size = self.spec.block_size
        blocks = [stream[i:i + size] for i in range(0, len(stream) - size + 1, size)]
        if not blocks:
            raise ConfigError(f"{where} holds {len(stream)} tokens, fewer than one block of data.block_size={size}")
        return Encoded([{"input_ids": b, "attention_mask": [1] * size, "labels": list(b)} for b in blocks])

    def _prompt_and_response(self, row: dict) -> tuple[str, str, bool]:
        """``(prompt text, response text, prompt has special tokens already)``."""
        instruction, extra, output = str(row["instruction"]), str(row.get("input") or ""), str(row["output"])
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            user = [{"role": "user", "content": instruction + (f"\n\n{extra}" if extra else "")}]
            prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
            full = tok.apply_chat_template(user + [{"role": "assistant", "content": output}], tokenize=False)
            if full.startswith(prompt):
                return prompt, full[len(prompt):], True
        prompt = ALPACA_PROMPT.format(extra=", paired with an input that provides further context" if extra else "",
                                      instruction=instruction, input=f"### Input:\n{extra}\n\n" if extra else "")
        return prompt, output + (tok.eos_token or ""), False

    def _encode_instructions(self, rows: list[dict], where: str) -> Encoded:
        if rows and not {"instruction", "output"} <= set(rows[0]):
            raise ConfigError(f"{where}: instruction data needs 'instruction' and 'output' fields "
                              f"(and optionally 'input'); found {', '.join(rows[0])}")
        tok, limit = self.tokenizer, self.spec.max_length
        parts = [self._prompt_and_response(r) for r in rows]
        templated = parts[0][2] if parts else False
        prompts = tok([p for p, _, _ in parts], add_special_tokens=not templated)["input_ids"]
        responses = tok([r for _, r, _ in parts], add_special_tokens=False)["input_ids"]
        features, truncated, dropped = [], 0, 0
        for prompt, response in zip(prompts, responses):
            ids = (prompt + response)[:limit]
            labels = ([IGNORE] * len(prompt) + response)[:limit]
            truncated += len(prompt) + len(response) > limit
            if all(label == IGNORE for label in labels[1:]):
                dropped += 1  # the prompt alone fills max_length: nothing left to learn
                continue
            features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
        return Encoded(features, truncated, dropped)


class Seq2Seq(Task):
    """Sequence to sequence (T5 and friends): source text -> target text. Loss and perplexity."""

    name = "seq2seq"
    auto_class = "AutoModelForSeq2SeqLM"
    peft_task = "SEQ_2_SEQ_LM"

    def encode(self, rows: Any, where: str) -> Encoded:
        if isinstance(rows, str):
            raise ConfigError(f"{where} is plain text; seq2seq needs rows with source and target fields")
        sources = [str(t) for t in column(rows, self.spec.text, where)]
        targets = [str(t) for t in column(rows, self.spec.label, where)]
        enc, truncated = self._tokenize(sources)
        tgt = self.tokenizer(text_target=targets, truncation=False)["input_ids"]
        truncated += sum(len(t) > self.spec.max_length for t in tgt)
        features = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                     "labels": tgt[i][:self.spec.max_length]} for i in range(len(sources))]
        return Encoded(features, truncated)


TASKS: dict[str, type[Task]] = {t.name: t for t in (SeqCls, TokenCls, CausalLM, Seq2Seq)}
PEFT_TASKS = {t.peft_task: t.name for t in TASKS.values()}


def get(name: str) -> type[Task]:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}") from None


def warn_truncation(encoded: Encoded, where: str, max_length: int) -> str | None:
    """A one-line note on truncated / dropped examples (also issued as a warning), or None."""
    notes = []
    if encoded.truncated:
        notes.append(f"{encoded.truncated} of {len(encoded) + encoded.dropped} {where} examples were longer than "
                     f"data.max_length={max_length} tokens and were truncated")
    if encoded.dropped:
        notes.append(f"{encoded.dropped} {where} examples were left out: their prompt alone fills max_length")
    if encoded.unlabelled:
        notes.append(f"{encoded.unlabelled} {where} rows were left out: their label field is empty "
                     f"(a line broken in two, or a missing value)")
    if notes:
        message = "; ".join(notes)
        warnings.warn(message, stacklevel=2)
        return message
    return None
