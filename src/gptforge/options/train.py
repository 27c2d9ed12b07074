"""Training options: TrainConfig, the defaults that differ from scratch and fine-tuning, the help groups."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import OptionError
from .base import (
    MAX_NEW_TOKENS,
    check_fields,
    flag_of,
    opt,
    parse_duration,
)

# --- training -----------------------------------------------------------------------------------------

# Defaults that differ between training from scratch and fine-tuning a pretrained model. A pretrained
# model needs a small step size or it forgets what it knows; a fresh small model learns fastest with a large one,
# Muon for the block matrices, a flat rate with a cooldown to zero and an average of its weights
# (docs/benchmarks.md, "More model per CPU minute"). An `ema` of 0 is no average.
SCRATCH_DEFAULTS = dict(
    learning_rate=2e-3,
    warmup_steps=100,
    weight_decay=0.1,
    beta2=0.95,
    optimizer="muon",
    schedule="wsd",
    min_lr_ratio=0.0,
    zero_init=False,
    ema=0.995,
)
MUON_LR_RATIO = 10  # Muon's peak rate per unit of --lr: 0.02 at the from-scratch 2e-3, 3e-3 at --lr 3e-4
FINETUNE_DEFAULTS = dict(
    learning_rate=5e-5,
    warmup_steps=50,
    weight_decay=0.01,
    beta2=0.999,
    optimizer="adamw",
    schedule="cosine",
    min_lr_ratio=0.1,
    zero_init=False,
    ema=0.0,
)


def unset_defaults(cfg: "TrainConfig", finetune: bool) -> dict:
    """The defaults of this kind of run for the options `cfg` leaves unset (None). With `--fsdp` a run from
    scratch takes AdamW and no average, which both need whole matrices (given by hand, they are refused)."""
    unset = {k: v for k, v in (FINETUNE_DEFAULTS if finetune else SCRATCH_DEFAULTS).items() if getattr(cfg, k) is None}
    if cfg.fsdp:
        unset.update({k: v for k, v in (("optimizer", "adamw"), ("ema", 0.0)) if k in unset})
    if cfg.muon_lr is None:  # one learning rate for a user: Muon's moves with --lr
        unset["muon_lr"] = MUON_LR_RATIO * unset.get("learning_rate", cfg.learning_rate)
    return unset


@dataclass
class TrainConfig:
    """Everything about a run except the model and the data. `None` means "the default for this kind of run"
    (SCRATCH_DEFAULTS or FINETUNE_DEFAULTS)."""

    out_dir: str = opt("run", "run folder: checkpoints, metrics, samples and the final model folder", flag="out")
    # how long: the first of these to be reached ends the run
    max_steps: int | None = opt(None, "optimizer steps to take")
    epochs: float | None = opt(None, "passes over the training tokens (may be fractional)")
    max_time: float | None = opt(
        None, "wall-clock budget, e.g. 90s, 10m, 1.5h; the schedule ends fully decayed at the deadline"
    )
    # batch
    batch_size: int = opt(16, "sequences per micro-step (per process)")
    grad_accum: int = opt(1, "micro-steps accumulated per optimizer step")
    block_size: int | None = opt(None, "tokens per sequence (default: the model's context length)")
    batch_mode: str = opt(
        "random", "random windows, or sequential passes over the data", choices=("random", "sequential")
    )
    stride: int | None = opt(
        None, "sequential mode: tokens between window starts (default: block size; half a block overlaps)"
    )
    # optimizer and schedule
    learning_rate: float | None = opt(
        None,
        "peak learning rate (default 2e-3 from scratch, 5e-5 fine-tuning); with Muon "
        "it sets AdamW's rate and Muon's moves with it (10 x --lr unless --muon-lr is given)",
        flag="lr",
    )
    min_lr_ratio: float | None = opt(
        None, "the schedule decays to learning_rate x this (default 0 from scratch, 0.1 fine-tuning)"
    )
    schedule: str | None = opt(
        None,
        "after warmup: cosine, linear, constant, or wsd (constant, then a linear cooldown; "
        "default wsd from scratch, cosine fine-tuning)",
        choices=("cosine", "linear", "constant", "wsd"),
    )
    cooldown: float = opt(0.4, "wsd schedule: the share of the run at its end spent decaying")
    warmup_steps: int | None = opt(None, "linear warmup steps (default 100 from scratch, 50 fine-tuning)")
    weight_decay: float | None = opt(
        None, "AdamW weight decay on matrices and embeddings (default 0.1 from scratch, 0.01 fine-tuning)"
    )
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float | None = opt(None, "AdamW beta2 (default 0.95 from scratch, 0.999 fine-tuning)")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0 turns clipping off)")
    optimizer: str | None = opt(
        None,
        "adamw, or muon (Muon for the matrices inside the blocks, AdamW for the rest; "
        "default muon from scratch (adamw with --fsdp), adamw fine-tuning)",
        choices=("adamw", "muon"),
    )
    muon_lr: float | None = opt(
        None,
        "Muon's own peak learning rate for the block matrices (default: 10 x --lr, 0.02 at "
        "the from-scratch 2e-3; the schedule scales it as it scales --lr)",
    )
    zero_init: bool | None = opt(
        None, "from scratch: start the blocks' output projections (attn and MLP c_proj) at zero (default off)"
    )
    ema: float | None = opt(
        None,
        "keep an exponential moving average of the weights with this decay; evaluations, best/ "
        "and the final model use it (default 0.995 from scratch, 0: none, fine-tuning)",
    )
    # speed
    device: str = opt(
        "auto", "auto (cuda, else mps on a Mac with an Apple GPU, else cpu), cpu, cuda, cuda:1, mps (fp32)"
    )
    precision: str = opt(
        "auto",
        "auto (fp32 on CPU, its products from bf16 inputs where measured much faster; bf16 on CUDA), fp32 "
        "(every product too), bf16 or fp16 (with a gradient scaler)",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    compile: bool = opt(False, "torch.compile the model")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass to save memory")
    fsdp: bool = opt(
        False, "shard parameters, gradients and optimizer state across the torchrun processes (big models)"
    )
    # watching
    log_interval: int = opt(10, "steps between log lines (the only host syncs of the step loop)")
    eval_strategy: str = opt(
        "steps",
        "when to evaluate: steps (every --eval-interval steps), epoch (after each pass over "
        "the training data) or no (at the end only)",
        choices=("steps", "epoch", "no"),
    )
    eval_interval: int | None = opt(
        200, "steps between validation evaluations (each costs time a timed run does not train)"
    )
    eval_tokens: int | None = opt(1 << 17, "validation tokens per periodic evaluation (the final one uses all)")
    sample_interval: int | None = opt(None, "steps between text samples (default: eval interval)")
    sample_prompt: str = opt("", "prompt for the samples (default: start of a document)")
    sample_tokens: int = opt(80, "tokens per sample")
    memorization: bool = opt(
        True,
        "at the end, a short memorization report: how much of the model's text copies its "
        "training text (16 samples of 64 tokens; the full one is `gptforge eval RUN --memorization`)",
    )
    early_stopping: int | None = opt(
        None, "stop after this many evaluations without a better validation score (the loss; macro-F1 for a classifier)"
    )
    report_to: str | None = opt(
        None, "also log to these, comma-separated: tensorboard, wandb, mlflow (each needs its package)"
    )
    tensorboard: bool = opt(False, "also log to TensorBoard (same as --report-to tensorboard)")
    plot: bool = opt(True, "draw loss.png at each evaluation")
    progress: bool = opt(True, "show a progress bar")
    # checkpoints
    save_strategy: str = opt(
        "steps",
        "when to save a checkpoint: steps (every --save-steps and every --save-minutes), "
        "epoch (after each pass over the training data) or no (at the end only)",
        choices=("steps", "epoch", "no"),
    )
    save_steps: int | None = opt(None, "steps between checkpoints")
    save_minutes: float | None = opt(15.0, "minutes between checkpoints")
    keep_checkpoints: int = opt(3, "how many recent checkpoints to keep")
    save_dtype: str = opt(
        "fp32",
        "weights of the final model folder and best/: fp32, or fp16 / bf16 (half the size; "
        "recorded as torch_dtype in config.json; checkpoints stay fp32 for an exact --resume)",
        choices=("fp32", "fp16", "bf16"),
    )
    resume: bool = opt(False, "continue the run in --out from its latest checkpoint")
    overwrite: bool = opt(False, "replace a previous run in --out")
    # transfer learning
    freeze: str | None = opt(None, "transfer learning: embeddings, blocks:N (first N blocks), all-but:N, comma-joined")
    seed: int = opt(1337, "random seed (weights, batches, dropout)")

    def __post_init__(self) -> None:
        if isinstance(self.max_time, str):  # "1h30m" from Python, as from the command line
            self.max_time = parse_duration(self.max_time)
        check_fields(
            self,
            {
                "batch_size": (1, None, True, int),
                "grad_accum": (1, None, True, int),
                "log_interval": (1, None, True, int),
                "keep_checkpoints": (1, None, True, int),
                "max_steps": (0, None, False, int),
                "epochs": (0, None, False, float),
                "max_time": (0, None, False, float),
                "eval_interval": (0, None, True, int),
                "save_steps": (0, None, False, int),
                "block_size": (0, None, False, int),
                "stride": (0, None, False, int),
                "learning_rate": (0, None, False, float),
                "min_lr_ratio": (0, 1, True, float),
                "cooldown": (0, 1, True, float),
                "muon_lr": (0, None, False, float),
                "warmup_steps": (0, None, True, int),
                "weight_decay": (0, None, True, float),
                "beta1": (0, 1, True, float, False),
                "beta2": (0, 1, True, float, False),
                "grad_clip": (0, None, True, float),
                "eval_tokens": (0, None, False, int),
                "sample_tokens": (0, MAX_NEW_TOKENS, True, int),
                "sample_interval": (0, None, True, int),
                "early_stopping": (0, None, False, int),
                "save_minutes": (0, None, False, float),
                "seed": (0, 2**63 - 1, True, int),
                "ema": (0, 1, True, float),
            },
        )
        if self.ema is not None and self.ema >= 1:
            raise OptionError(f"--ema {self.ema!r}: a decay below 1 (0.99 averages about the last 100 steps)")
        if self.ema and self.fsdp:
            raise OptionError("--ema keeps whole weights, which --fsdp shards; use DDP (no --fsdp) or leave --ema off")
        unknown = [r for r in self.reporters if r not in REPORTERS]
        if unknown:
            raise OptionError(
                f"--report-to {self.report_to!r}: {', '.join(unknown)} unknown; choose from {', '.join(REPORTERS)}"
            )
        for name in (
            "schedule",
            "precision",
            "batch_mode",
            "optimizer",
            "eval_strategy",
            "save_strategy",
            "save_dtype",
        ):
            choices = next(f.metadata["choices"] for f in dataclasses.fields(self) if f.name == name)
            if getattr(self, name) not in (*choices, None):
                raise OptionError(f"{flag_of(TrainConfig, name)} {getattr(self, name)!r}: choose {', '.join(choices)}")
        if self.resume and self.overwrite:
            raise OptionError("--resume continues the run in --out and --overwrite replaces it; give one of them")
        if self.optimizer == "muon" and self.fsdp:
            raise OptionError(
                "--optimizer muon orthogonalises whole matrices, which --fsdp shards; use DDP (no --fsdp) or adamw"
            )

    @property
    def reporters(self) -> list[str]:
        """The external loggers asked for (--report-to, and --tensorboard)."""
        names = self.report_to.split(",") if isinstance(self.report_to, str) else list(self.report_to or [])
        names = [n.strip().lower() for n in names if n.strip()]
        return list(dict.fromkeys(names + (["tensorboard"] if self.tensorboard else [])))


REPORTERS = ("tensorboard", "wandb", "mlflow")
# How `gptforge train --help` groups the TrainConfig options (the command adds its own flags to these groups).
TRAIN_GROUPS = {
    "data": (),
    "reading and cleaning": (),
    "model": ("freeze", "seed"),
    "length": ("max_steps", "epochs", "max_time"),
    "batch and optimizer": (
        "batch_size",
        "grad_accum",
        "block_size",
        "batch_mode",
        "stride",
        "learning_rate",
        "min_lr_ratio",
        "schedule",
        "cooldown",
        "warmup_steps",
        "weight_decay",
        "beta1",
        "beta2",
        "grad_clip",
        "optimizer",
        "muon_lr",
        "zero_init",
        "ema",
    ),
    "precision and speed": ("device", "precision", "compile", "gradient_checkpointing", "fsdp"),
    "evaluation and samples": (
        "memorization",
        "eval_strategy",
        "eval_interval",
        "eval_tokens",
        "sample_interval",
        "sample_prompt",
        "sample_tokens",
        "early_stopping",
    ),
    "checkpoints and output": (
        "out_dir",
        "save_strategy",
        "save_steps",
        "save_minutes",
        "keep_checkpoints",
        "save_dtype",
        "resume",
        "overwrite",
    ),
    "logging": ("log_interval", "report_to", "tensorboard", "plot", "progress"),
    "LoRA adapters": ("lora_r", "lora_alpha", "lora_dropout", "lora_targets"),
    "instruction data": ("chat_template", "train_on_prompt"),
    "preference tuning": ("preference", "beta"),
}
