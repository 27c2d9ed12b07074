"""What trains and how fast: frozen parts, the AdamW optimizer, and the learning-rate schedule."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import OptionError
from ..options import TrainConfig
from ..runtime import torch_version


def apply_freeze(model: nn.Module, spec: str | None) -> int:
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
            raise OptionError(
                f"--freeze {part!r}: expected embeddings, blocks:N or all-but:N with N between 0 and n_layer={n_layer}"
            )
    for module in frozen:
        module.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if not p.requires_grad)


def configure_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight matrices and embeddings are decayed (as GPT-2 and nanoGPT do), biases and LayerNorm are not.

    The fused kernel on CUDA, and on the CPU from torch 2.4 (where it exists): there it updates each tensor
    in one multithreaded pass and takes a fraction of the foreach version's time (benchmarks/bench_train.py)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda" or (device.type == "cpu" and torch_version() >= (2, 4))
    kind = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), **kind)


def lr_at(cfg: TrainConfig, step: int, progress: float, warmup_share: float | None = None) -> float:
    """Learning rate at optimizer step `step`, `progress` in [0, 1] being the share of the run done (of the
    steps or of the time budget, whichever is further along). Linear warmup, over the first `warmup_share`
    of the run when given (so it follows whichever limit ends the run) or else over `cfg.warmup_steps`
    steps, then decay to the floor at progress 1."""
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


def warmup_share(cfg: TrainConfig, max_steps: int | None, default_warmup: bool) -> float | None:
    """The share of the run to warm up over, when the run has a time budget (None: warm up by steps).

    With steps and a time budget, the warmup is `warmup_steps / max_steps` of the progress, which is the
    further along of the two: so warmup and decay both follow whichever limit ends the run. With a time
    budget alone, the default warmup is the first 2% of the time."""
    if not cfg.max_time:
        return None
    if max_steps:
        return cfg.warmup_steps / max_steps if cfg.warmup_steps else None
    return 0.02 if default_warmup else None


__all__ = ["apply_freeze", "configure_optimizer", "lr_at", "warmup_share"]
