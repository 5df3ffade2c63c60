"""The training loop: plain PyTorch, readable in one sitting.

Per optimizer step: take the next ``grad_accum`` global batches, give this process its share
of each (run padding-free where the model allows, else in one process cut into pieces of
similar length), weight every micro-batch's mean loss by how many items it averages over (so
pieces, gradient accumulation and DDP give the same gradient as one big batch), backward, clip,
step. Around that: evaluation, best-weights tracking, early stopping, checkpoints and logs.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from deltatune.core.attention_dropout import CpuDropout
from deltatune.train import checkpoint, fsdp
from deltatune.train.batching import epoch_batches, length_pieces, shard
from deltatune.train.callbacks import MetricsLog, Progress
from deltatune.train.distributed import Dist
from deltatune.train.interrupt import TrainingInterrupted
from deltatune.train.packing import Packer
from deltatune.train.optim import build_optimizer, build_schedule
from deltatune.train.recipe import TrainSpec
from deltatune.train.tasks import Encoded, Task

LOWER_IS_BETTER = ("loss", "perplexity")


@dataclass
class Outcome:
    """What :meth:`Trainer.fit` reports back."""

    steps: int
    epochs: float
    metrics: dict          #: evaluation metrics of the returned weights ({} without eval data)
    best: dict | None      #: {"step", "metric", "value"} of the best evaluation, if any
    stopped_early: bool
    train_loss: float | None
    elapsed: float         #: training seconds, summed over resumed runs
    tokens: int            #: non-padding tokens trained on


class Trainer:
    """Trains ``model`` (its ``requires_grad`` parameters) on ``train_set`` for ``task``."""

    def __init__(self, model: nn.Module, task: Task, train_set: Encoded, eval_set: Encoded | None,
                 spec: TrainSpec, dist: Dist, output_dir: Path, autocast: Callable = contextlib.nullcontext,
                 log: MetricsLog | None = None, extra_logs: tuple = (), fingerprint: str = "") -> None:
        self.module, self.task, self.spec, self.dist = model, task, spec, dist
        self.train_set, self.eval_set, self.autocast = train_set, eval_set, autocast
        self.lengths = train_set.lengths
        self.ckpt_dir = output_dir / "checkpoints"
        self.log = log or MetricsLog(output_dir / "metrics.jsonl", enabled=False)
        self.extra_logs, self.fingerprint = extra_logs, fingerprint
        self.sharded = dist.active and fsdp.strategy(spec.distributed) == "fsdp"
        if self.sharded:  # before the optimizer, so that its state is sharded too
            fsdp.check_optimizer(spec.optimizer)
            fsdp.shard(model, dist, spec.fsdp_offload)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, spec)
        # DDP all-reduces exactly the parameters with requires_grad: the adapter's
        self.model = model
        if dist.active and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=ids)
        if spec.compile:
            # only the training calls; evaluation and saving use self.module, uncompiled
            self.model = torch.compile(self.model)
        # compiled graphs would see the packed shapes and hooks change every step; FSDP's own
        # hooks gather each block's shards around the same calls
        self.packer = Packer(model) if spec.padding_free and not spec.compile and not self.sharded else None
        if self.packer is not None and not self.packer.usable:
            self.packer = None  # encoder-decoders (two stacks) and models without blocks: nothing to pack
        self.packer_checked = False
        # NumPy-drawn dropout masks on the CPU (core/attention_dropout.py), held across the
        # backward too, where gradient checkpointing runs the blocks again; a compiled graph keeps
        # torch's. Found once: the scope opens around every micro-batch
        self.dropout_sites = CpuDropout(model) if dist.device.type == "cpu" and not spec.compile else None
        self.global_batch = spec.batch_size * dist.world_size
        self.batches_per_epoch = len(self._batches(0))
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / spec.grad_accum)
        self.total_steps = spec.epochs * self.steps_per_epoch
        if spec.max_steps is not None:
            self.total_steps = min(self.total_steps, spec.max_steps)
        self.scheduler = build_schedule(self.optimizer, spec, self.total_steps)
        self.metric = task.selection_metric(spec.best_metric)
        #: set (by a Ctrl-C handler) to save a checkpoint after the current step and stop
        self.stop_requested = threading.Event()
        self._window_start = time.perf_counter()
        self.state = {"step": 0, "epoch": 0, "micro": 0, "best": None, "bad_evals": 0, "elapsed": 0.0,
                      "tokens": 0, "window": [0.0, 0, 0], "last_loss": None, "last_eval": None,
                      "world_size": dist.world_size, "global_batch": self.global_batch, "fingerprint": fingerprint}

    def _batches(self, epoch: int) -> list[list[int]]:
        return epoch_batches(self.lengths, self.global_batch, self.spec.seed, epoch,
                             self.spec.group_by_length, drop_below=self.dist.world_size)

    # --- the loop ---------------------------------------------------------------------------
    def fit(self, resume_from: Path | None = None, progress: Progress | None = None) -> Outcome:
        """Train to the end (or an early stop); returns the metrics of the weights left in the model."""
        if resume_from is not None:
            self.state.update(checkpoint.restore(resume_from, self.module, self.optimizer, self.scheduler, self.dist,
                                                 self.global_batch))
        elif self.eval_set is not None and self.spec.eval_on_start:
            self._evaluate()  # step 0: the starting point of the curves
        progress = progress or Progress(self.total_steps, self.state["step"], self.spec.log_every, enabled=False)
        started, stopped = time.perf_counter() - self.state["elapsed"], False
        every_ckpt = self.spec.checkpoint_every or self.spec.eval_every or 100
        while self.state["step"] < self.total_steps and not stopped:
            batches = self._batches(self.state["epoch"])
            while self.state["micro"] < len(batches) and self.state["step"] < self.total_steps:
                group = batches[self.state["micro"]:self.state["micro"] + self.spec.grad_accum]
                loss, tokens = self._train_step(group)
                self.state["micro"] += len(group)
                self.state["step"] += 1
                self._record_step(loss, tokens, progress)
                step = self.state["step"]
                if self.eval_set is not None and self.spec.eval_every and step % self.spec.eval_every == 0:
                    stopped = self._evaluate(progress)
                self.state["elapsed"] = time.perf_counter() - started
                asked_to_stop = self.stop_requested.is_set() and step < self.total_steps and not stopped
                if (step % every_ckpt == 0 or asked_to_stop) and step < self.total_steps and not stopped:
                    checkpoint.save(self.ckpt_dir, self.module, self.optimizer, self.scheduler, self.state,
                                    self.dist, self.spec.keep_checkpoints)
                if asked_to_stop:
                    raise TrainingInterrupted(checkpoint.latest(self.ckpt_dir), step)
                if stopped:
                    break
            if self.state["micro"] >= len(batches):
                self.state["epoch"], self.state["micro"] = self.state["epoch"] + 1, 0
        if self.eval_set is not None and (self.state["last_eval"] or {}).get("step") != self.state["step"]:
            self._evaluate(progress)
        self.state["elapsed"] = time.perf_counter() - started
        return self._finish(stopped)

    def _train_step(self, group: list[list[int]]) -> tuple[float, int]:
        """One optimizer step over ``group`` (global micro-batches); returns (mean loss, tokens)."""
        self.model.train()
        features = self.train_set.features
        if self.packer is not None and not self.packer_checked:
            self._check_packing(self.task.collate([features[i] for i in shard(group[0], self.dist.rank,
                                                                              self.dist.world_size)]))
        micro = [self.task.collate([features[i] for i in piece]) for b in group for piece in self._pieces(b)]
        units = [self.task.loss_units(b) for b in micro]
        total_units = self.dist.sum(sum(units))
        loss_sum, tokens = 0.0, 0
        for i, batch in enumerate(micro):
            batch = {k: v.to(self.dist.device) for k, v in batch.items()}
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if last or not self.dist.active else fsdp.gradient_sync_paused(self.model)
            packed = self.packer.active(batch.get("attention_mask")) if self.packer else contextlib.nullcontext()
            dropout = self.dropout_sites.active() if self.dropout_sites else contextlib.nullcontext()
            with sync, packed, dropout:  # backward too: gradient checkpointing runs the blocks again
                with self.autocast():
                    out = self.model(**batch)
                loss = out.loss.float()
                penalty = self._penalty()
                if penalty is not None:  # a method's regulariser, e.g. diff pruning's L0 term
                    loss = loss + penalty.float()
                # the model's loss is a mean over units[i] items; DDP and FSDP divide by world_size
                (loss * (units[i] * self.dist.world_size / total_units)).backward()
            loss_sum += float(out.loss.detach()) * units[i]
        if self.spec.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.spec.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.dist.sum(loss_sum) / total_units, tokens

    def _pieces(self, batch: list[int]) -> list[list[int]]:
        """This process's share of a global batch, as the micro-batches to run. Several processes
        keep their share whole: each forward of DDP and FSDP is a collective call, so every
        process must run as many as the others."""
        mine = shard(batch, self.dist.rank, self.dist.world_size)
        if self.spec.split_by_length and not self.dist.active and self.packer is None:
            return length_pieces(mine, self.lengths)
        return [mine]

    def _check_packing(self, batch: dict[str, torch.Tensor]) -> None:
        """Keep padding-free training only if ``batch`` gives the padded outputs that way too.
        A batch without padding proves nothing: the check waits for one with."""
        mask = batch.get("attention_mask")
        if mask is None:
            reason = "the task's batches carry no attention mask"
        elif bool(mask.all()):
            return
        else:
            reason = self.packer.verify({k: v.to(self.dist.device) for k, v in batch.items()})
        self.packer_checked = True
        if reason is not None:
            self.packer = None
            if self.dist.main:
                warnings.warn(f"padding-free training is off for this model: {reason}; its batches run padded"
                              f"{' in pieces of similar length' if self.spec.split_by_length else ''} instead "
                              f"(set train.padding_free: false to skip this check)", stacklevel=2)

    def _penalty(self) -> torch.Tensor | None:
        hook = getattr(self.module, "training_penalty", None)
        return hook() if hook is not None else None

    # --- reporting, evaluation, stopping ------------------------------------------------------
    def _record_step(self, loss: float, tokens: int, progress: Progress) -> None:
        step, window = self.state["step"], self.state["window"]
        window[0] += loss
        window[1] += 1
        window[2] += tokens
        self.state["last_loss"] = loss
        lr = self.scheduler.get_last_lr()[0]
        progress.step(step, window[0] / window[1], lr)  # the window's mean, as metrics.jsonl gets
        if step % self.spec.log_every == 0 or step == self.total_steps:
            all_tokens = int(self.dist.sum(window[2]))
            self.state["tokens"] += all_tokens
            rate = all_tokens / max(time.perf_counter() - getattr(self, "_window_start", time.perf_counter()), 1e-9)
            self._write({"kind": "train", "step": step, "epoch": round(self._epochs(), 4),
                         "loss": window[0] / window[1], "lr": lr, "tokens_per_s": round(rate, 1)})
            self.state["window"] = [0.0, 0, 0]
            self._window_start = time.perf_counter()

    def _epochs(self) -> float:
        return self.state["epoch"] + self.state["micro"] / max(self.batches_per_epoch, 1)

    def _write(self, record: dict) -> None:
        if self.dist.main:
            self.log.write(record)
            for writer in self.extra_logs:
                writer.write(record)

    def evaluate(self) -> dict:
        """Evaluation metrics of the current weights (computed on rank 0, shared with all ranks;
        under FSDP every rank runs the sharded model along)."""
        metrics = None
        if self.dist.main or self.sharded:
            batch_size = self.spec.eval_batch_size or self.spec.batch_size * 2
            metrics = self.task.evaluate(self.module, self.eval_set, batch_size, self.dist.device, self.autocast)
        return self.dist.broadcast(metrics)

    def _evaluate(self, progress: Progress | None = None) -> bool:
        """Evaluate, log, keep the best weights; returns True when early stopping says stop."""
        metrics = self.evaluate()
        step = self.state["step"]
        self.state["last_eval"] = {"step": step, **metrics}
        self._write({"kind": "eval", "step": step, "epoch": round(self._epochs(), 4), **metrics})
        if progress is not None:
            progress.write(f"eval @ step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if step == 0:
            return False  # the untrained start is a reference point, not a candidate
        value, best = metrics[self.metric], self.state["best"]
        better = best is None or (value < best["value"] if self.metric in LOWER_IS_BETTER else value > best["value"])
        if better:
            self.state["best"] = {"step": step, "metric": self.metric, "value": value, "metrics": metrics}
            self.state["bad_evals"] = 0
            if self.spec.restore_best:
                checkpoint.save_best(self.ckpt_dir, self.module, self.state["best"], self.dist)
        else:
            self.state["bad_evals"] += 1
        return self.spec.patience is not None and self.state["bad_evals"] >= self.spec.patience

    def _finish(self, stopped: bool) -> Outcome:
        metrics = {k: v for k, v in (self.state["last_eval"] or {}).items() if k != "step"}
        best = self.state["best"]
        if best is not None and self.spec.restore_best and best["step"] != self.state["step"]:
            checkpoint.restore_best(self.ckpt_dir, self.module)
            metrics = dict(best["metrics"])
        return Outcome(steps=self.state["step"], epochs=round(self._epochs(), 4), metrics=metrics,
                       best={k: v for k, v in best.items() if k != "metrics"} if best else None,
                       stopped_early=stopped, train_loss=self.state["last_loss"],
                       elapsed=self.state["elapsed"], tokens=self.state["tokens"])
