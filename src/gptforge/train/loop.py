"""The training loop: steps, accumulation, evaluation cadence, checkpoints, signals.

A run folder (`out_dir`) ends up as a model folder transformers can open, plus:

    checkpoints/step-0000100/   complete model folder + trainer_state.pt (optimizer, step, RNG, clock)
    best/                       model folder with the lowest validation loss so far (best_validation.json: step, score)
    metrics.jsonl               one JSON object per log line and per evaluation
    loss.png                    train / validation loss curves (drawn with matplotlib, a dependency)
    samples.txt                 text sampled from the model during training

What is trained is a task (`tasks.py`: language modelling by default). The order of batches is a pure
function of (seed, micro-step, rank, world size) (`data.batches.Batches` for language modelling),
and the checkpoint holds every other piece of state, so a run stopped at step N and resumed reaches the
same parameters as a run that never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..data.batches import Prefetcher
from ..data.dataset import RunData
from ..errors import OptionError, TokenizerError, TrainingError
from ..faults import on_stop_signals, restore_signal_handlers
from ..fsio import atomic_dir
from ..kernels import bf16_products
from ..model import GPT
from ..options import PREVIEW_SAMPLING, TrainConfig, unset_defaults
from ..runtime import cpu_bf16_products, init_distributed, out_of_memory, pick_precision, resolve_device, shard_model
from . import state
from .average import WeightAverage
from .callbacks import Callbacks
from .logging import RunLog, StepProgress, describe_run
from .optim import apply_freeze, configure_optimizer, freeze_parts, lr_at, warmup_share
from .report import memorization_summary, say_if_best_was_better
from .runfolder import (
    batch_change_note,
    check_block_size,
    check_fits_memory,
    check_same_run,
    check_same_setup,
    check_tokenizer_of_data,
    clear_previous_run,
    refuse_previous_run,
)
from .tasks import LanguageModelling, Task


@dataclass
class TrainResult:
    step: int
    out_dir: Path
    train_loss: float | None
    val_loss: float | None = None
    val_perplexity: float | None = None
    val_bits_per_byte: float | None = None
    best_val_loss: float | None = None
    best_step: int | None = None  # the step of best/, the evaluation with the best validation score
    interrupted: bool = False
    history: list = field(default_factory=list, repr=False)
    validation: dict | None = field(default=None, repr=False)  # the final evaluation row, whatever the task


class Trainer:
    """One training run. `run()` trains; `request_stop()` (also wired to Ctrl-C / SIGTERM) makes it save and return."""

    def __init__(
        self,
        model: GPT,
        data: RunData,
        cfg: TrainConfig,
        tokenizer=None,
        finetune: bool = False,
        on_step: Callable[["Trainer"], None] | None = None,
        task: Task | None = None,
        callbacks: Callbacks | None = None,
    ):
        unset = unset_defaults(cfg, finetune)
        self.cfg = cfg = dataclasses.replace(cfg, **unset)
        self.out = Path(cfg.out_dir)
        self.data, self.tokenizer = data, tokenizer
        self.callbacks = callbacks if callbacks is not None else Callbacks(on_step=on_step)  # train/callbacks.py
        self.task = task if task is not None else LanguageModelling(data)  # what is trained: batches, loss, evaluation
        self.dist, self.device = init_distributed(resolve_device(cfg.device))
        self.dtype = pick_precision(cfg.precision, self.device)
        self.bf16_products = cpu_bf16_products(cfg.precision, self.device)
        config = model.config
        self.block_size = cfg.block_size or config.n_positions
        check_block_size(self.block_size, config)
        if tokenizer is not None:
            from ..tokenizer import check_vocab_fits

            check_vocab_fits(tokenizer, config.vocab_size)
            check_tokenizer_of_data(tokenizer, data)
        elif (data.vocab_size or 0) > config.vocab_size:  # a dataset folder and a model, no tokenizer to compare
            raise TokenizerError(
                f"{data.source}: prepared with a tokenizer of {data.vocab_size} tokens but the model has "
                f"vocab_size={config.vocab_size}; build the model with vocab_size >= {data.vocab_size}"
            )
        check_fits_memory(config, cfg, self.block_size, self.device)
        self.log = RunLog(self.out, self.dist.main, cfg.reporters, cfg.plot, config=dataclasses.asdict(cfg))
        self._check_out_dir()

        torch.manual_seed(cfg.seed)
        config.gradient_checkpointing = cfg.gradient_checkpointing
        self.model = model.to(self.device)
        self.frozen = apply_freeze(model, cfg.freeze)
        self._resume_from, self._resume_state = self._latest_checkpoint() if cfg.resume else (None, None)
        if self._resume_from is not None:  # weights first: sharding and the optimizer start from them
            self.task.load(model, self._resume_from)
            # the defaults a run started with stay its defaults (a run begun by an older version resumes as it began;
            # its saved ema of None was no average)
            saved = self._resume_state.get("train_config", {}) if self._resume_state else {}
            self.cfg = cfg = dataclasses.replace(cfg, **{k: saved[k] for k in unset if k in saved})
        self.fsdp = cfg.fsdp and self.dist.world_size > 1
        if self.fsdp:
            shard_model(model)
        self.optimizer = configure_optimizer(model, cfg, self.device)
        self.average = WeightAverage(model, cfg.ema) if cfg.ema else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.forward_model: nn.Module = torch.compile(model) if cfg.compile else model
        if self.dist.world_size > 1 and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.forward_model = DDP(
                self.forward_model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

        self.batches = self.task.make_batches(cfg, self.block_size, self.dist.rank, self.dist.world_size)
        self.tokens_per_step = self.task.tokens_per_batch(cfg, self.block_size) * cfg.grad_accum * self.dist.world_size
        self.max_steps = self._total_steps()
        # A short run should not spend itself warming up: by default warm up over at most a tenth of the steps.
        if "warmup_steps" in unset and self.max_steps:
            self.cfg = cfg = dataclasses.replace(cfg, warmup_steps=min(cfg.warmup_steps, self.max_steps // 10))
        self.warmup_share = warmup_share(cfg, self.max_steps, "warmup_steps" in unset)

        self.step, self.elapsed = 0, 0.0  # optimizer steps; training seconds, carried across resumes
        self.best_val, self.evals_since_best = (-math.inf if self.task.higher_is_better else math.inf), 0
        self.best_step: int | None = 0  # the step of best/ (None: resumed from a checkpoint that did not record it)
        self._stop = False
        self._last_ckpt: Path | None = None
        if self._resume_from is not None:
            self._load_training_state(self._resume_from, self._resume_state)
            self._resume_state = None  # the optimizer holds it now

    @property
    def history(self) -> list[dict]:
        return self.log.history

    # -- set-up helpers

    def _total_steps(self) -> int | None:
        cfg, steps = self.cfg, []
        if cfg.max_steps:
            steps.append(cfg.max_steps)
        if cfg.epochs:
            steps.append(max(1, math.ceil(cfg.epochs * self.batches.steps_per_epoch / cfg.grad_accum)))
        if not steps and not cfg.max_time:
            raise OptionError("say how long to train: --max-steps, --epochs or --max-time")
        return min(steps) if steps else None

    def _check_out_dir(self) -> None:
        previous = refuse_previous_run(self.out, self.cfg)
        if previous and not self.cfg.resume and self.dist.main:
            clear_previous_run(self.out)

    def _progress(self) -> float:
        parts = [self.step / self.max_steps] if self.max_steps else []
        if self.cfg.max_time:
            parts.append(self.elapsed / self.cfg.max_time)
        return max(parts)

    # -- checkpoints

    def _latest_checkpoint(self) -> tuple[Path, dict]:
        """The newest intact checkpoint of this run and its training state, checked to belong to this run."""
        path, saved = state.newest_intact_checkpoint(self.out, self.log.message)
        check_same_run(path, saved, self.data, self.tokenizer)
        check_same_setup(path, saved, self.model.config, self.resume_options())
        return path, saved

    def resume_options(self) -> dict:
        """What a resumed run must give as it began: the task's own options, the frozen layers, and the LoRA
        adapters (their shape, scale and base model), each of which changes what the checkpoint's state means."""
        lora = getattr(self.model, "lora", None) or {}
        freeze = None
        if self.cfg.freeze:  # what is frozen, however it is spelled (all-but:0 of one layer is embeddings,blocks:1)
            parts = freeze_parts(self.cfg.freeze, self.model.config.n_layer)
            embeddings, blocks = any(e for e, _ in parts), max(b for _, b in parts)
            freeze = ",".join(["embeddings"] * embeddings + [f"blocks:{blocks}"] * (blocks > 0)) or None
        return {
            **self.task.options,
            "--freeze": freeze,
            "--lora-r": lora.get("r"),
            "--lora-alpha": lora.get("alpha"),
            "--lora-targets": ",".join(sorted(lora.get("targets", []))) or None,
            "the base model": lora.get("fingerprint"),
        }

    def _full_state(self) -> tuple[dict, dict]:
        return state.gather(self.model, self.optimizer, self.fsdp)  # every rank takes part when sharded

    def save_model_folder(
        self, folder: Path, model_state: dict | None = None, record: tuple[str, float] | None = None
    ) -> None:
        """Write a model folder atomically (rank 0 writes; with FSDP every rank helps gather); `record`
        (metric, score): the evaluation a best/ folder's model won, written inside it."""
        if model_state is None and self.fsdp:
            model_state = self._full_state()[0]
        model_state = self._in_save_dtype(model_state)
        if self.dist.main:
            with atomic_dir(folder) as tmp:
                self.task.save(self.model, tmp, self.tokenizer, state_dict=model_state)
                if record:
                    state.record_best(tmp, self.step, *record)

    def _in_save_dtype(self, model_state: dict | None) -> dict | None:
        """The weights of a model folder in --save-dtype (checkpoints keep fp32 for an exact resume)."""
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.cfg.save_dtype)
        if dtype is None:
            return model_state
        state = model_state if model_state is not None else self.model.state_dict()
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}

    def save_checkpoint(self) -> Path:
        """A complete model folder plus the training state, written under a temporary name and renamed."""
        model_state, optim_state = self._full_state()
        target = self.out / state.CHECKPOINTS / f"step-{self.step:07d}"
        if self.dist.main:
            packed = state.pack(self, optim_state)
            write = lambda folder: self.task.save(self.model, folder, self.tokenizer, state_dict=model_state)  # noqa: E731
            state.save_checkpoint(self.out, self.step, write, packed, self.cfg.keep_checkpoints)
        self.dist.barrier()
        self._last_ckpt = target
        self.callbacks.call("on_save", self, target)
        return target

    def _load_training_state(self, path: Path, saved: dict | None = None) -> None:
        saved = saved if saved is not None else state.load_training_state(path)
        average = state.restore(self, saved)
        self.log.continue_from(self.step, final_again=self._done())  # a finished run evaluates its last step again
        self._last_ckpt = path
        ranks = saved.get("world_size", 1)
        self.log.message(
            f"resumed from {path} at step {self.step}"
            + (f" (saved by {ranks} processes, now {self.dist.world_size})" if ranks != self.dist.world_size else "")
            + average
        )
        note = batch_change_note(saved, self.cfg)
        if note:
            self.log.message(note)

    # -- evaluation and samples

    def evaluate(self, full: bool = False) -> dict | None:
        # a sharded model needs every rank in each forward pass; otherwise rank 0 evaluates alone
        if not self.task.has_validation or not (self.dist.main or self.fsdp):
            return None
        with self._averaged():
            return self._evaluate(full)

    def _averaged(self):
        """The weight average in the model for the duration, when --ema keeps one."""
        return self.average.applied() if self.average is not None else contextlib.nullcontext()

    def _evaluate(self, full: bool) -> dict:
        row = {
            "step": self.step,
            **self.task.evaluate(self.model, full=full, trainer=self),
            "elapsed": round(self.elapsed, 2),
        }
        self.log.record(row)
        self.log.message(f"step {self.step}: {self.task.describe(row)}")
        score = row[self.task.metric]
        if self.task.better(score, self.best_val):
            self.best_val, self.best_step, self.evals_since_best = score, self.step, 0
            self.save_model_folder(self.out / "best", record=(self.task.metric, score))
        else:
            self.evals_since_best += 1
        self.log.plot()
        self.callbacks.call("on_evaluate", self, row)
        return row

    def sample(self) -> None:
        if (
            self.tokenizer is None
            or not self.task.can_sample
            or not self.cfg.sample_tokens  # --sample-tokens 0: none
            or not (self.dist.main or self.fsdp)
        ):
            return
        from ..generate import generate

        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            text = generate(
                self.model,
                self.tokenizer,
                self.cfg.sample_prompt,
                max_new_tokens=self.cfg.sample_tokens,
                seed=self.step,
                **PREVIEW_SAMPLING,
            )[0]
        self.log.sample(self.step, text)

    # -- the loop

    def _stop_requested(self) -> None:
        self.log.message("interrupt received: saving a checkpoint after this step (press Ctrl-C again to abort)")
        self._stop = True

    def request_stop(self) -> None:
        self._stop = True

    def _micro_step(self, batch: tuple, sync: bool) -> torch.Tensor:
        model = self.forward_model
        if self.fsdp:
            self.model.set_requires_gradient_sync(sync)  # reduce-scatter only on the last micro-step
        no_sync = (
            model.no_sync() if self.dist.world_size > 1 and not self.fsdp and not sync else contextlib.nullcontext()
        )
        with no_sync:
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                loss = self.task.loss(model, batch)
            self.scaler.scale(loss / self.cfg.grad_accum).backward()
        return loss.detach()

    def _optimizer_step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.average is not None:
            self.average.update()

    def _done(self) -> bool:
        if self.max_steps and self.step >= self.max_steps:
            return True
        return bool(self.cfg.max_time and self.elapsed >= self.cfg.max_time)

    def run(self) -> TrainResult:
        self.out.mkdir(parents=True, exist_ok=True)
        self.log.message(describe_run(self))
        handlers = on_stop_signals(self._stop_requested, lambda: self._stop)
        bar = StepProgress(self.max_steps, self.cfg.max_time, self.step, main=self.dist.main, bar=self.cfg.progress)
        feed = Prefetcher(self.batches, self.step * self.cfg.grad_accum, self.device)
        with bf16_products(self.bf16_products):  # the run's products, its evaluations' too
            try:
                train_loss = self._steps(iter(feed), bar)
            except (RuntimeError, MemoryError) as e:  # CUDA's OutOfMemoryError is a RuntimeError too
                if not out_of_memory(e):
                    raise
                raise TrainingError(
                    f"out of memory at step {self.step} (batch {self.cfg.batch_size} x {self.block_size}). Lower "
                    "--batch-size and raise --grad-accum to keep the tokens per step, lower --block-size, add "
                    "--gradient-checkpointing, or pick a smaller model"
                ) from None
            finally:
                feed.close()
                bar.close()
                restore_signal_handlers(handlers)
            return self._finish(train_loss)

    def _steps(self, batches, bar) -> float | None:
        """Optimizer steps until a limit, early stopping or a stop request; the last logged training loss."""
        cfg = self.cfg
        loss_sum = torch.zeros((), device=self.device)
        window = {"micro": 0, "tokens": 0, "start": time.perf_counter()}  # the current logging window
        started = time.perf_counter() - self.elapsed  # evaluations and saves count too: a deadline is a deadline
        last_save, train_loss = time.perf_counter(), None
        self.model.train()
        while not self._done() and not self._stop:
            lr = lr_at(cfg, self.step, self._progress(), self.warmup_share)
            for micro in range(cfg.grad_accum):
                loss_sum += self._micro_step(next(batches), sync=micro == cfg.grad_accum - 1)
            self._optimizer_step(lr)
            self.step += 1
            window["micro"] += cfg.grad_accum
            window["tokens"] += self.tokens_per_step
            self.elapsed = time.perf_counter() - started
            bar.advance(self.step, self.elapsed)
            if self.step % cfg.log_interval == 0 or self._done():
                train_loss = self._log_window(loss_sum, window, lr, bar)
            paused = time.perf_counter()  # callbacks, evaluations, samples and saves are not training steps
            self.callbacks.call("on_step", self)
            if not self._done():
                epoch_end = self._epoch_ended()
                if self._between_steps(epoch_end):
                    break
                if self._save_due(epoch_end, last_save):
                    self.save_checkpoint()
                    last_save = time.perf_counter()
            window["start"] += time.perf_counter() - paused  # so tokens/s counts training time only
        return train_loss

    def _log_window(self, loss_sum: torch.Tensor, window: dict, lr: float, bar) -> float:
        train_loss = (loss_sum / window["micro"]).item()  # the only host sync, once per log interval
        if not math.isfinite(train_loss):
            raise TrainingError(
                f"loss became {train_loss} at step {self.step}; the last good checkpoint is "
                f"{self._last_ckpt or 'none (none was saved yet)'}. Lower --lr, keep --grad-clip, "
                "or use --precision bf16/fp32 instead of fp16"
            )
        now = time.perf_counter()
        tps = window["tokens"] / max(now - window["start"], 1e-9)
        row = {
            "step": self.step,
            "loss": train_loss,
            "lr": lr,
            "tokens_per_s": round(tps, 1),
            "elapsed": round(self.elapsed, 2),
            **self.task.log_metrics(),
        }
        self.log.record(row)
        bar.show(self.step, train_loss, lr, tps, self.elapsed)
        self.callbacks.call("on_log", self, row)
        loss_sum.zero_()
        window.update(micro=0, tokens=0, start=now)
        return train_loss

    def _epoch_ended(self) -> bool:
        """Whether this step finished a pass over the training data (its last micro-batch crossed an epoch's end)."""
        per_epoch, accum = self.batches.steps_per_epoch, self.cfg.grad_accum
        return per_epoch > 0 and (self.step * accum) // per_epoch > ((self.step - 1) * accum) // per_epoch

    def _save_due(self, epoch_end: bool, last_save: float) -> bool:
        """--save-strategy: steps (every --save-steps, and every --save-minutes), epoch, or no (the end only)."""
        cfg = self.cfg
        if cfg.save_strategy != "steps":
            return cfg.save_strategy == "epoch" and epoch_end
        return bool(
            (cfg.save_steps and self.step % cfg.save_steps == 0)
            or (cfg.save_minutes and time.perf_counter() - last_save >= cfg.save_minutes * 60)
        )

    def _between_steps(self, epoch_end: bool = False) -> bool:
        """Periodic evaluation (--eval-strategy: every --eval-interval steps, each epoch, or no) and samples;
        True when early stopping ends the run."""
        cfg = self.cfg
        by_steps = cfg.eval_strategy == "steps" and cfg.eval_interval and self.step % cfg.eval_interval == 0
        evaluate = epoch_end if cfg.eval_strategy == "epoch" else bool(by_steps)
        sample_every = cfg.sample_interval
        if evaluate:
            self.evaluate()
            self.model.train()
            if cfg.early_stopping and self.evals_since_best >= cfg.early_stopping:
                self.log.message(f"early stopping: no improvement in {cfg.early_stopping} evaluations")
                return True
        if (self.step % sample_every == 0) if sample_every else evaluate:  # samples follow evaluations by default
            self.sample()
            self.model.train()
        return False

    def _finish(self, train_loss: float | None) -> TrainResult:
        """The last checkpoint; for a finished run also the full evaluation, a sample and the final model folder."""
        interrupted = self._stop and not self._done()
        self.save_checkpoint()
        result = TrainResult(self.step, self.out, train_loss, interrupted=interrupted, history=self.history)
        if interrupted:
            self.log.message(
                f"stopped at step {self.step}; checkpoint saved to {self._last_ckpt}; continue with --resume"
            )
        else:
            row = self.evaluate(full=True)
            if row:
                result.val_loss, result.val_perplexity = row.get("val_loss"), row.get("val_perplexity")
                result.val_bits_per_byte, result.validation = row.get("val_bits_per_byte"), row
                say_if_best_was_better(self, row)
            if self.average is not None:
                self.average.install()  # the model in memory (GPTForge.train's, a caller's) is the one saved
            self.sample()
            model_state = self._full_state()[0] if self.fsdp else None
            if self.dist.main:
                self.task.save(self.model, self.out, self.tokenizer, state_dict=self._in_save_dtype(model_state))
                self.log.message(
                    f"saved the final model to {self.out}"
                    + (f" (the average of its weights, --ema {self.cfg.ema:g})" if self.average else "")
                )
                self.callbacks.call("on_save", self, self.out)
                memorization_summary(self)
        if math.isfinite(self.best_val):
            result.best_val_loss, result.best_step = self.best_val, self.best_step
        self.log.close()
        self.dist.close()
        return result


__all__ = ["TrainResult", "Trainer", "refuse_previous_run"]
