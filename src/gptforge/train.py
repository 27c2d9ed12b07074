"""The training loop: optimizer, schedule, precision, accumulation, evaluation, checkpoints, resume, DDP.

A run folder (`out_dir`) ends up as a model folder transformers can open, plus:

    checkpoints/step-0000100/   complete model folder + trainer_state.pt (optimizer, step, RNG, clock)
    best/                       model folder with the lowest validation loss so far
    metrics.jsonl               one JSON object per log line and per evaluation
    loss.png                    train / validation loss curves (when matplotlib is installed)
    samples.txt                 text sampled from the model during training

The order of batches is a pure function of (seed, micro-step, rank, world size) (`data.Batches`), and the
checkpoint holds every other piece of state, so a run stopped at step N and resumed reaches the same
parameters as a run that never stopped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .checkpoint import atomic_dir, load_model, save_model
from .config import GPTConfig, preset
from .model import GPT, _matmul

STATE_NAME = "trainer_state.pt"
CHECKPOINTS = "checkpoints"


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, out of memory); the message says what to change."""


class RunFolderError(ValueError):
    """The output folder and the requested run do not fit together."""


# --- configuration ---------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything about a run except the model and the data. `None` means "the default for this kind of run"
    (see SCRATCH_DEFAULTS and FINETUNE_DEFAULTS)."""

    out_dir: str = "run"
    # how long: the first of these to be reached ends the run
    max_steps: int | None = None
    epochs: float | None = None
    max_time: float | None = None  # seconds; the schedule is laid over elapsed time
    # batch
    batch_size: int = 16  # sequences per micro-step (per process)
    grad_accum: int = 1  # micro-steps per optimizer step
    block_size: int | None = None  # defaults to the model's context length
    batch_mode: str = "random"  # "random" windows or "sequential" passes with `stride`
    stride: int | None = None
    # optimizer and schedule
    learning_rate: float | None = None
    min_lr_ratio: float = 0.1  # the schedule decays to learning_rate * min_lr_ratio
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int | None = None
    weight_decay: float | None = None
    beta1: float = 0.9
    beta2: float | None = None
    grad_clip: float = 1.0
    # speed
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool = False
    gradient_checkpointing: bool = False
    fsdp: bool = False  # shard parameters, gradients and optimizer state across ranks (torchrun)
    # watching
    log_interval: int = 10
    eval_interval: int | None = 200
    eval_tokens: int | None = 1 << 17  # cap on validation tokens per periodic evaluation (the final one uses all)
    sample_interval: int | None = None  # defaults to eval_interval
    sample_prompt: str = ""
    sample_tokens: int = 80
    early_stopping: int | None = None  # stop after this many evaluations without improvement
    tensorboard: bool = False
    plot: bool = True
    progress: bool = True
    # checkpoints
    save_steps: int | None = None
    save_minutes: float | None = 15.0
    keep_checkpoints: int = 3
    resume: bool = False
    overwrite: bool = False
    # transfer learning
    freeze: str | None = None  # "embeddings", "blocks:N" (first N), "all-but:N" (all but the last N blocks), comma-joined
    seed: int = 1337

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "log_interval", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "epochs", "max_time", "eval_interval", "save_steps", "block_size", "learning_rate"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"--schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.batch_mode not in ("random", "sequential"):
            raise ValueError(f"--batch-mode must be random or sequential, got {self.batch_mode!r}")


# Defaults that differ between training from scratch and fine-tuning a pretrained model. A pretrained
# model needs a small step size or it forgets what it knows; a fresh small model learns fastest with a large one.
SCRATCH_DEFAULTS = dict(learning_rate=1e-3, warmup_steps=100, weight_decay=0.1, beta2=0.95)
FINETUNE_DEFAULTS = dict(learning_rate=5e-5, warmup_steps=50, weight_decay=0.01, beta2=0.999)


def parse_duration(text: str | float | int) -> float:
    """Seconds from '90', '90s', '10m', '1.5h'."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not m:
        raise ValueError(f"--max-time {text!r}: expected a duration like 90s, 10m or 1.5h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


# --- pieces -----------------------------------------------------------------------------------------


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for a run (float32 means no autocast).

    CPUs without AMX run bf16 matrix products far slower than fp32, so `auto` keeps CPUs at fp32.
    On CUDA, bf16 where the GPU has it; fp16 (with a gradient scaler) only where it does not.
    """
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        fast_bf16 = "AMX" in torch.backends.cpu.get_cpu_capability()
        return torch.bfloat16 if fast_bf16 else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def apply_freeze(model: GPT, spec: str | None) -> int:
    """Freeze parts of the model for transfer learning; returns the number of frozen parameters.

    `embeddings` freezes wte (and with it the tied output head) and wpe; `blocks:N` the first N blocks;
    `all-but:N` the embeddings and every block but the last N.
    """
    if not spec:
        return 0
    tr, n_layer = model.transformer, model.config.n_layer
    frozen: list[nn.Module] = []
    for part in spec.split(","):
        name, _, arg = part.strip().partition(":")
        if name == "embeddings":
            frozen += [tr.wte, tr.wpe]
        elif name in ("blocks", "all-but") and arg.isdigit() and int(arg) <= n_layer:
            k = int(arg) if name == "blocks" else n_layer - int(arg)
            frozen += list(tr.h[:k]) + ([tr.wte, tr.wpe] if name == "all-but" else [])
        else:
            raise ValueError(
                f"--freeze {part!r}: expected embeddings, blocks:N or all-but:N with N between 0 and n_layer={n_layer}"
            )
    for module in frozen:
        module.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if not p.requires_grad)


def configure_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight matrices and embeddings are decayed (as GPT-2 and nanoGPT do), biases and LayerNorm are not.

    The fused kernel on CUDA and on the CPU too: there it updates each tensor in one multithreaded pass and
    takes a fraction of the foreach version's time (benchmarks/bench_train.py)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kind = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), **kind)


def lr_at(cfg: TrainConfig, step: int, progress: float, warmup_share: float | None = None) -> float:
    """Learning rate at optimizer step `step`, `progress` in [0, 1] being the share of the run done
    (of the steps, or of the wall-clock budget). Linear warmup over `cfg.warmup_steps` (or over the
    first `warmup_share` of the run when the step count is unknown), then decay to the floor at progress 1."""
    if warmup_share:
        warm = min(1.0, progress / warmup_share)
    else:
        warm = min(1.0, (step + 1) / (cfg.warmup_steps + 1)) if cfg.warmup_steps else 1.0
    p = min(max(progress, 0.0), 1.0)
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        decay = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    elif cfg.schedule == "linear":
        decay = 1 - (1 - floor) * p
    else:
        decay = 1.0
    return cfg.learning_rate * warm * decay


# --- data -------------------------------------------------------------------------------------------


@dataclass
class RunData:
    """Token arrays of a prepared dataset and what is needed to turn a loss into bits per byte."""

    train: object
    val: object | None
    bytes_per_token: float | None  # validation UTF-8 bytes per token
    fingerprint: str = ""


def load_run_data(data) -> RunData:
    """`data` is a prepared dataset folder (with meta.json) or a TokenDataset."""
    from .data import load_split

    folder = getattr(data, "data_dir", data)
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: not a prepared dataset (no meta.json); run `gptforge prepare` or pass text files")
    meta = json.loads(meta_path.read_text())
    val_meta = meta.get("val") or {}
    val = load_split(folder, "val") if val_meta.get("tokens") else None
    bpt = val_meta["bytes"] / val_meta["tokens"] if val_meta.get("tokens") else None
    fingerprint = json.dumps(meta.get("fingerprint") or meta.get("inputs") or "", sort_keys=True)
    return RunData(load_split(folder, "train"), val, bpt, fingerprint)


# --- distributed ------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this run started the process group, so it ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        """Wait for every rank, then end the process group this run started. A rank that exits while
        another still writes, with gloo's threads alive, can abort with 'terminate called without an
        active exception'."""
        self.barrier()
        if self.owns_group:
            torch.distributed.destroy_process_group()
            self.owns_group = False


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun set up (WORLD_SIZE > 1); a plain process is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local, owns), device


def shard_model(model: GPT) -> None:
    """FSDP (PyTorch's fully_shard): each block is one unit of all-gather / reduce-scatter; the root holds
    the embeddings, the tied head and the final LayerNorm."""
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)


def refuse_previous_run(out: Path, cfg: TrainConfig) -> list[str]:
    """The files of an earlier run in `out`; an error unless this run resumes or overwrites it."""
    previous = [n for n in ("metrics.jsonl", CHECKPOINTS) if (out / n).exists()]
    if previous and not cfg.resume and not cfg.overwrite:
        raise RunFolderError(
            f"{out}: holds another run ({', '.join(previous)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    return previous


# --- the trainer ------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    step: int
    out_dir: Path
    train_loss: float | None
    val_loss: float | None = None
    val_perplexity: float | None = None
    val_bits_per_byte: float | None = None
    best_val_loss: float | None = None
    interrupted: bool = False
    history: list = field(default_factory=list, repr=False)


class Trainer:
    """One training run. `run()` trains; `request_stop()` (also wired to Ctrl-C / SIGTERM) makes it save and return."""

    def __init__(self, model: GPT, data: RunData, cfg: TrainConfig, tokenizer=None, finetune: bool = False,
                 on_step: Callable[["Trainer"], None] | None = None):
        defaults = FINETUNE_DEFAULTS if finetune else SCRATCH_DEFAULTS
        unset = {k: v for k, v in defaults.items() if getattr(cfg, k) is None}
        self.cfg = cfg = dataclasses.replace(cfg, **unset)
        self.out = Path(cfg.out_dir)
        self.data, self.tokenizer, self.on_step = data, tokenizer, on_step
        self.device = resolve_device(cfg.device)
        self.dist, self.device = init_distributed(self.device)
        self.dtype = pick_precision(cfg.precision, self.device)

        config = model.config
        self.block_size = cfg.block_size or config.n_positions
        if self.block_size > config.n_positions:
            raise ValueError(f"--block-size {self.block_size} is larger than the model's context n_positions={config.n_positions}")
        if tokenizer is not None:
            from .tokenizer import check_vocab_fits

            check_vocab_fits(tokenizer, config.vocab_size)
        self._check_out_dir()

        torch.manual_seed(cfg.seed)
        config.gradient_checkpointing = cfg.gradient_checkpointing
        self.model = model.to(self.device)
        self.frozen = apply_freeze(model, cfg.freeze)
        self._resume_from = self._latest_checkpoint() if cfg.resume else None
        if self._resume_from is not None:  # weights first: sharding and the optimizer start from them
            model.load_state_dict(load_model(self._resume_from).state_dict())
        self.fsdp = cfg.fsdp and self.dist.world_size > 1
        if self.fsdp:
            shard_model(model)
        self.optimizer = configure_optimizer(model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.forward_model: nn.Module = torch.compile(model) if cfg.compile else model
        if self.dist.world_size > 1 and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.forward_model = DDP(self.forward_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        from .data import Batches

        self.batches = Batches(data.train, self.block_size, cfg.batch_size, mode=cfg.batch_mode, stride=cfg.stride,
                               seed=cfg.seed, rank=self.dist.rank, world_size=self.dist.world_size)
        self.tokens_per_step = cfg.batch_size * self.block_size * cfg.grad_accum * self.dist.world_size
        self.max_steps = self._total_steps()
        # A short run should not spend itself warming up: by default warm up over at most a tenth of the
        # steps, or over the first 2% of the time when only a time budget is given.
        self.warmup_share = None
        if "warmup_steps" in unset and self.max_steps:
            self.cfg = cfg = dataclasses.replace(cfg, warmup_steps=min(cfg.warmup_steps, self.max_steps // 10))
        elif "warmup_steps" in unset:
            self.warmup_share = 0.02

        self.step = 0
        self.elapsed = 0.0  # training seconds, carried across resumes
        self.best_val = math.inf
        self.evals_since_best = 0
        self._stop = False
        self.history: list[dict] = []
        self._last_ckpt: Path | None = None
        if self._resume_from is not None:
            self._load_training_state(self._resume_from)

    # -- set-up helpers

    def _total_steps(self) -> int | None:
        cfg, steps = self.cfg, []
        if cfg.max_steps:
            steps.append(cfg.max_steps)
        if cfg.epochs:
            micro = cfg.epochs * self.batches.steps_per_epoch
            steps.append(max(1, math.ceil(micro / cfg.grad_accum)))
        if not steps and not cfg.max_time:
            raise ValueError("say how long to train: --max-steps, --epochs or --max-time")
        return min(steps) if steps else None

    def _check_out_dir(self) -> None:
        cfg, out = self.cfg, self.out
        previous = refuse_previous_run(out, cfg)
        if not previous or cfg.resume:
            return
        if self.dist.main:
            for name in (CHECKPOINTS, "best", "metrics.jsonl", "samples.txt", "loss.png"):
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    def _progress(self) -> float:
        parts = []
        if self.max_steps:
            parts.append(self.step / self.max_steps)
        if self.cfg.max_time:
            parts.append(self.elapsed / self.cfg.max_time)
        return max(parts)

    # -- checkpoints

    def checkpoints(self) -> list[Path]:
        root = self.out / CHECKPOINTS
        return sorted(p for p in root.glob("step-*") if (p / STATE_NAME).is_file()) if root.is_dir() else []

    def _latest_checkpoint(self) -> Path:
        found = self.checkpoints()
        if not found:
            raise RunFolderError(f"{self.out}: no checkpoint to resume from (looked in {self.out / CHECKPOINTS})")
        path = found[-1]
        theirs, mine = GPTConfig.load(path).to_dict(), self.model.config.to_dict()
        differ = [f"{k}: checkpoint {theirs[k]} vs now {mine[k]}" for k in mine if k in theirs and mine[k] != theirs[k]]
        if differ:
            raise RunFolderError(f"{path}: was trained with a different model config ({'; '.join(differ)})")
        return path

    def _full_state(self) -> tuple[dict, dict]:
        """Whole model and optimizer state dicts, keyed by parameter name, gathered from every rank when the
        model is sharded (so all ranks must call this). The same format for 1, N or sharded ranks is what lets
        a checkpoint resume on any number of processes."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            model_state = get_model_state_dict(self.model, options=full)
        else:
            model_state = self.model.state_dict()
        return model_state, get_optimizer_state_dict(self.model, self.optimizer, options=full)

    def save_model_folder(self, folder: Path, model_state: dict | None = None) -> None:
        """Write a model folder atomically (rank 0 writes; with FSDP every rank helps gather)."""
        if model_state is None and self.fsdp:
            model_state = self._full_state()[0]
        if self.dist.main:
            with atomic_dir(folder) as tmp:
                save_model(self.model, tmp, self.tokenizer, state_dict=model_state)

    def save_checkpoint(self) -> Path:
        """A complete model folder plus the training state, written under a temporary name and renamed."""
        target = self.out / CHECKPOINTS / f"step-{self.step:07d}"
        model_state, optim_state = self._full_state()
        if self.dist.main:
            state = {
                "step": self.step,
                "elapsed": self.elapsed,
                "best_val": self.best_val,
                "evals_since_best": self.evals_since_best,
                "optimizer": optim_state,
                "scaler": self.scaler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "train_config": dataclasses.asdict(self.cfg),
                "data": self.data.fingerprint,
                "world_size": self.dist.world_size,
            }
            with atomic_dir(target) as tmp:
                save_model(self.model, tmp, self.tokenizer, state_dict=model_state)
                torch.save(state, tmp / STATE_NAME)
            for old in self.checkpoints()[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        self._last_ckpt = target
        return target

    def _load_training_state(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.best_val, self.evals_since_best = state["best_val"], state["evals_since_best"]
        self._last_ckpt = path
        ranks = state.get("world_size", 1)
        self.log(f"resumed from {path} at step {self.step}"
                 + (f" (saved by {ranks} processes, now {self.dist.world_size})" if ranks != self.dist.world_size else ""))

    # -- logging

    def log(self, message: str) -> None:
        if self.dist.main:
            from tqdm import tqdm

            tqdm.write(message)

    def _record(self, row: dict) -> None:
        self.history.append(row)
        if self.dist.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if self._tb is not None:
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self._tb.add_scalar(k, v, row["step"])

    # -- evaluation and samples

    def evaluate(self, full: bool = False) -> dict | None:
        # a sharded model needs every rank in each forward pass; otherwise rank 0 evaluates alone
        if self.data.val is None or not (self.dist.main or self.fsdp):
            return None
        from .evaluate import evaluate_tokens

        res = evaluate_tokens(
            self.model, self.data.val, block_size=self.block_size, batch_size=self.cfg.batch_size,
            max_tokens=None if full else self.cfg.eval_tokens, device=self.device,
            autocast_dtype=self.dtype if self.dtype != torch.float32 else None,
        )
        bpb = res.loss / math.log(2) / self.data.bytes_per_token if self.data.bytes_per_token else None
        row = {"step": self.step, "val_loss": res.loss, "val_perplexity": res.perplexity, "val_bits_per_byte": bpb,
               "val_tokens": res.tokens, "elapsed": round(self.elapsed, 2)}
        if self.dist.main:
            self._record(row)
        msg = f"step {self.step}: val loss {res.loss:.4f}, perplexity {res.perplexity:.2f}"
        self.log(msg + (f", {bpb:.4f} bits/byte" if bpb is not None else ""))
        if res.loss < self.best_val:
            self.best_val, self.evals_since_best = res.loss, 0
            self.save_model_folder(self.out / "best")
        else:
            self.evals_since_best += 1
        self._plot()
        return row

    def sample(self) -> None:
        if self.tokenizer is None or not (self.dist.main or self.fsdp):
            return
        from .generate import generate

        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            text = generate(self.model, self.tokenizer, self.cfg.sample_prompt, max_new_tokens=self.cfg.sample_tokens,
                            temperature=0.8, top_k=40, seed=self.step)[0]
        self.log(f"--- sample at step {self.step} ---\n{text}\n---")
        if not self.dist.main:
            return
        with open(self.out / "samples.txt", "a", encoding="utf-8") as f:
            f.write(f"=== step {self.step} ===\n{text}\n\n")

    def _plot(self) -> None:
        if not self.cfg.plot:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        train = [(r["step"], r["loss"]) for r in self.history if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.history if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        for points, label in ((train, "train"), (val, "validation")):
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if label == "validation" else None)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.out / "loss.png", dpi=100)
        plt.close(fig)

    # -- the loop

    def request_stop(self) -> None:
        self._stop = True

    def _micro_step(self, x: torch.Tensor, y: torch.Tensor, sync: bool) -> torch.Tensor:
        model = self.forward_model
        if self.fsdp:
            self.model.set_requires_gradient_sync(sync)  # reduce-scatter only on the last micro-step
        no_sync = model.no_sync() if self.dist.world_size > 1 and not self.fsdp and not sync else contextlib.nullcontext()
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with no_sync:
            with autocast:
                _, loss = model(x, y)
            self.scaler.scale(loss / self.cfg.grad_accum).backward()
        return loss.detach()

    def _optimizer_step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _done(self) -> bool:
        if self.max_steps and self.step >= self.max_steps:
            return True
        return bool(self.cfg.max_time and self.elapsed >= self.cfg.max_time)

    def _describe(self) -> None:
        cfg, c = self.cfg, self.model.config
        length = " and ".join(
            s for s in (f"{self.max_steps} steps" if self.max_steps else "", f"{cfg.max_time:.0f}s" if cfg.max_time else "") if s
        )
        self.log(
            f"model: {self.model.num_params() / 1e6:.2f}M parameters (n_layer={c.n_layer}, n_embd={c.n_embd}, "
            f"n_head={c.n_head}, vocab={c.vocab_size}){f', {self.frozen:,} frozen' if self.frozen else ''}\n"
            f"device: {self.device}, precision: {str(self.dtype).removeprefix('torch.')}, world size {self.dist.world_size}\n"
            f"batch: {cfg.batch_size} x {self.block_size} tokens x {cfg.grad_accum} accumulation"
            f"{f' x {self.dist.world_size} ranks' if self.dist.world_size > 1 else ''} = {self.tokens_per_step:,} tokens per step\n"
            f"optimizer: AdamW lr {cfg.learning_rate:g} ({cfg.schedule}, warmup "
            f"{f'{self.warmup_share:.0%} of the time' if self.warmup_share else f'{cfg.warmup_steps} steps'}, floor x{cfg.min_lr_ratio}), "
            f"weight decay {cfg.weight_decay}, betas ({cfg.beta1}, {cfg.beta2}), clip {cfg.grad_clip}\n"
            f"length: {length}; training tokens: {len(self.data.train):,}; output: {self.out}"
        )

    def run(self) -> TrainResult:
        from tqdm import tqdm

        from .data import Prefetcher

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if cfg.tensorboard and self.dist.main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        self._describe()
        eval_every = cfg.eval_interval
        sample_every = cfg.sample_interval or eval_every
        handlers = self._install_signal_handlers()
        bar = tqdm(total=self.max_steps, initial=self.step, disable=not (cfg.progress and self.dist.main),
                   unit="step", dynamic_ncols=True)
        feed = Prefetcher(self.batches, self.step * cfg.grad_accum, self.device)
        batches = iter(feed)
        loss_sum = torch.zeros((), device=self.device)
        n_logged, last_log, last_save = 0, time.perf_counter(), time.perf_counter()
        started = time.perf_counter() - self.elapsed  # the clock counts evaluations and saves too: a deadline is a deadline
        tokens_since = 0
        self.model.train()
        train_loss = None
        try:
            while not self._done() and not self._stop:
                lr = lr_at(cfg, self.step, self._progress(), self.warmup_share)
                for micro in range(cfg.grad_accum):
                    x, y = next(batches)
                    loss_sum += self._micro_step(x, y, sync=micro == cfg.grad_accum - 1)
                self._optimizer_step(lr)
                self.step += 1
                n_logged += cfg.grad_accum
                tokens_since += self.tokens_per_step
                self.elapsed = time.perf_counter() - started
                bar.update(1)

                if self.step % cfg.log_interval == 0 or self._done():
                    train_loss = (loss_sum / n_logged).item()  # the only host sync, once per log interval
                    if not math.isfinite(train_loss):
                        raise TrainingError(
                            f"loss became {train_loss} at step {self.step}; the last good checkpoint is "
                            f"{self._last_ckpt or 'none (none was saved yet)'}. Lower --learning-rate, keep --grad-clip, "
                            "or use --precision bf16/fp32 instead of fp16"
                        )
                    now = time.perf_counter()
                    tps = tokens_since / (now - last_log)
                    row = {"step": self.step, "loss": train_loss, "lr": lr, "tokens_per_s": round(tps, 1),
                           "elapsed": round(self.elapsed, 2)}
                    self._record(row)
                    left = (cfg.max_time - self.elapsed) if cfg.max_time else None
                    bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}",
                                    **({"left": f"{left:.0f}s"} if left is not None else {}))
                    loss_sum.zero_()
                    n_logged, tokens_since, last_log = 0, 0, now
                paused = time.perf_counter()  # callbacks, evaluations, samples and saves are not training steps
                if self.on_step is not None:
                    self.on_step(self)
                if eval_every and self.step % eval_every == 0 and not self._done():
                    self.evaluate()
                    self.model.train()
                    if cfg.early_stopping and self.evals_since_best >= cfg.early_stopping:
                        self.log(f"early stopping: no improvement in {cfg.early_stopping} evaluations")
                        break
                if sample_every and self.step % sample_every == 0 and not self._done():
                    self.sample()
                    self.model.train()
                due_steps = cfg.save_steps and self.step % cfg.save_steps == 0
                due_time = cfg.save_minutes and time.perf_counter() - last_save >= cfg.save_minutes * 60
                if (due_steps or due_time) and not self._done():
                    self.save_checkpoint()
                    last_save = time.perf_counter()
                last_log += time.perf_counter() - paused  # so tokens/s counts training time only
        except torch.OutOfMemoryError:
            raise TrainingError(
                f"out of memory at step {self.step} (batch {cfg.batch_size} x {self.block_size}). Lower --batch-size and raise "
                "--grad-accum to keep the tokens per step, lower --block-size, add --gradient-checkpointing, or pick a smaller model"
            ) from None
        finally:
            feed.close()
            bar.close()
            self._restore_signal_handlers(handlers)

        interrupted = self._stop and not self._done()
        self.save_checkpoint()
        result = TrainResult(self.step, self.out, train_loss, interrupted=interrupted, history=self.history)
        if interrupted:
            self.log(f"stopped at step {self.step}; checkpoint saved to {self._last_ckpt}; continue with --resume")
        else:
            row = self.evaluate(full=True)
            if row:
                result.val_loss, result.val_perplexity = row["val_loss"], row["val_perplexity"]
                result.val_bits_per_byte = row["val_bits_per_byte"]
            self.sample()
            if self.fsdp:
                model_state = self._full_state()[0]
            else:
                model_state = None
            if self.dist.main:
                save_model(self.model, self.out, self.tokenizer, state_dict=model_state)
                self.log(f"saved the final model to {self.out}")
        result.best_val_loss = self.best_val if math.isfinite(self.best_val) else None
        if self._tb is not None:
            self._tb.close()
        self.dist.close()
        return result

    def _install_signal_handlers(self):
        """Ctrl-C and SIGTERM finish the current step, save a checkpoint and return."""
        if threading.current_thread() is not threading.main_thread():
            return {}  # signal handlers can only be set from the main thread
        previous = {}

        def handler(signum, frame):
            if self._stop:  # a second Ctrl-C: give up at once
                raise KeyboardInterrupt
            self.log("interrupt received: saving a checkpoint after this step (press Ctrl-C again to abort)")
            self._stop = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)


# --- entry points -------------------------------------------------------------------------------------


def build_model(init: str | None = None, size: str | GPTConfig = "mini", **overrides) -> tuple[GPT, bool]:
    """The model to train and whether it is a fine-tune: pretrained weights from `init` (a model folder,
    weights file or hub id), or fresh GPT-2 weights for `size` (a preset name or a GPTConfig) with
    config fields overridden."""
    if init is not None:
        return load_model(init), True
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config = dataclasses.replace(size, **overrides) if isinstance(size, GPTConfig) else preset(size, **overrides)
    return GPT(config), False


def train(
    model: GPT,
    data,
    config: TrainConfig | None = None,
    *,
    tokenizer=None,
    finetune: bool = False,
    on_step: Callable[[Trainer], None] | None = None,
    **options,
) -> TrainResult:
    """Train `model` on `data` (a prepared dataset folder or TokenDataset). Options are TrainConfig fields."""
    cfg = dataclasses.replace(config, **options) if config else TrainConfig(**options)
    if tokenizer is None:
        tokenizer = getattr(data, "tokenizer", None)
    trainer = Trainer(model, load_run_data(data), cfg, tokenizer=tokenizer, finetune=finetune, on_step=on_step)
    return trainer.run()


def matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """The best FLOP/s of `repeats` n x n matrix products on `device`, by the kernel the model's layers use
    (`model._matmul`: oneDNN on x86 CPUs): what the hardware gives right now."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        _matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times[1:])


SCRATCH_SIZES = ("tiny", "mini", "small", "gpt2")  # the presets `choose_size` picks from, smallest first
TOKENS_PER_PARAM = 2.0  # a size is picked only if the run shows it at least this many tokens per parameter
MAX_EPOCHS_COUNTED = 10  # passes over the data beyond this many teach a model little more
STEP_EFFICIENCY = 0.4  # share of the matmul rate a training step achieves (2-core CPU, oneDNN: tiny 40%, mini 55%)


def choose_size(
    train_tokens: int, cfg: TrainConfig, vocab_size: int, *, flops_per_s: float | None = None
) -> tuple[str, str]:
    """The preset for a from-scratch run where the user named none, and the reason, in words.

    The largest of SCRATCH_SIZES that the run can feed: one that will see at least TOKENS_PER_PARAM
    training tokens per parameter, repeats of the data beyond MAX_EPOCHS_COUNTED passes not counted.
    What a run will see follows from --max-steps or --epochs; for --max-time it is estimated from the
    device's matrix-product rate (`flops_per_s`, measured when not given) and each size's FLOPs per token.
    A short CPU budget thus gets a small model that takes many steps rather than a big one that takes few:
    in ten minutes on a 2-core CPU, `tiny` reached 2.12 bits per byte on fortunes_en.txt where `mini`
    reached 2.44 (docs/benchmarks.md).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.max_time is not None and flops_per_s is None:
        device = resolve_device(cfg.device)
        flops_per_s = matmul_flops(device, pick_precision(cfg.precision, device)) * world
    chosen, why = SCRATCH_SIZES[0], ""
    for name in SCRATCH_SIZES:
        config = preset(name, vocab_size=vocab_size)
        block = min(cfg.block_size or config.n_positions, config.n_positions)
        if cfg.max_time is not None:
            tokens, how = cfg.max_time * flops_per_s * STEP_EFFICIENCY / config.flops_per_token(block), "in the time"
        elif cfg.max_steps is not None:
            tokens, how = cfg.max_steps * cfg.batch_size * cfg.grad_accum * world * block, "in the steps"
        else:
            tokens, how = (cfg.epochs or 1.0) * train_tokens, "in the epochs"
        seen = min(tokens, MAX_EPOCHS_COUNTED * train_tokens)
        per_param = seen / config.num_params()
        line = f"about {seen / 1e6:,.1f}M tokens {how}, {per_param:.2g} per parameter"
        if name != SCRATCH_SIZES[0] and per_param < TOKENS_PER_PARAM:
            return chosen, f"{why}; {name!r} would see only {per_param:.2g} per parameter"
        chosen, why = name, line
    return chosen, why


def run_training(
    inputs: list[str] | None = None,
    *,
    data: str | None = None,
    eval_inputs: list[str] | None = None,
    init: str | None = None,
    size: str | None = None,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    tokenizer_kind: str = "bpe",
    line_by_line: bool = False,
    model_overrides: dict | None = None,
    log: Callable[[str], None] = print,
    **options,
) -> TrainResult:
    """From raw text (or a prepared dataset) to a trained model folder, choosing what the user did not say.

    Fine-tuning (`init` names a pretrained model) uses that model's tokenizer; training from scratch
    trains a tokenizer on the inputs (or uses `tokenizer`), prepares the data under `out_dir/data`, and
    picks a model size for the data unless `size` is given. Every choice is printed.
    """
    from .data import prepare
    from .tokenizer import load_tokenizer, train_tokenizer

    cfg = TrainConfig(**options)
    out = Path(cfg.out_dir)
    refuse_previous_run(out, cfg)  # now, not after minutes of tokenizer training and preparation
    if int(os.environ.get("RANK", "0")) != 0:
        log = lambda message: None  # noqa: E731 - only rank 0 talks
    if not inputs and not data:
        raise ValueError("nothing to train on: give text files or folders, or --data with a prepared dataset")
    model = None
    names = ", ".join(map(str, inputs or [])) if len(inputs or []) <= 3 else f"{len(inputs)} inputs ({inputs[0]}, ...)"
    if init is not None:
        folder = load_model_folder(init)
        model, _ = build_model(str(folder))
        try:
            tok = load_tokenizer(tokenizer or folder)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"{init}: no usable tokenizer in the model folder ({e}); pass --tokenizer") from None
        log(f"fine-tuning {init} with its own tokenizer ({tok.vocab_size:,} tokens)")
    elif tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        log(f"tokenizer: {tokenizer} ({tok.vocab_size:,} tokens)")
    elif data is not None:
        tok = load_tokenizer(Path(data) / "tokenizer")
        log(f"tokenizer: the one the dataset {data} was prepared with ({tok.vocab_size:,} tokens)")
    else:
        tok_dir = out / "tokenizer"
        log(f"training a {tokenizer_kind} tokenizer on {names} -> {tok_dir}")
        tok = train_tokenizer(inputs, vocab_size=vocab_size or 5000, kind=tokenizer_kind, out_dir=tok_dir)
        log(f"tokenizer: {tok.vocab_size:,} tokens")
    if data is None:
        data = out / "data"
        log(f"preparing {names} -> {data}")
        meta = prepare(inputs, tok, data, line_by_line=line_by_line, val_inputs=eval_inputs, seed=cfg.seed)
        log(f"data: {meta['train']['tokens']:,} training tokens, {meta['val']['tokens']:,} validation tokens")
    run_data = load_run_data(data)
    if model is None:
        overrides = dict(model_overrides or {})
        overrides.setdefault("vocab_size", tok.vocab_size)
        overrides.setdefault("bos_token_id", tok.eos_id)
        overrides.setdefault("eos_token_id", tok.eos_id)
        if cfg.block_size:
            overrides.setdefault("n_positions", cfg.block_size)
        if size is None:
            size, why = choose_size(len(run_data.train), cfg, overrides["vocab_size"])
            log(f"model size: {size!r}: {why} (choose another with --size)")
        torch.manual_seed(cfg.seed)  # the same fresh weights on every rank and every rerun
        model, _ = build_model(size=size, **overrides)
    if cfg.max_steps is None and cfg.epochs is None and cfg.max_time is None:
        cfg = dataclasses.replace(cfg, epochs=1.0)
        log("length: 1 epoch (set --max-steps, --epochs or --max-time)")
    trainer = Trainer(model, run_data, cfg, tokenizer=tok, finetune=init is not None)
    return trainer.run()


def load_model_folder(name_or_path: str) -> Path:
    """The local folder of a model (downloaded first when it is a hub id)."""
    from .checkpoint import resolve_model_path

    path = resolve_model_path(name_or_path)
    return path if path.is_dir() else path.parent
