"""What trains and how fast: frozen parts, the optimizers (AdamW, Muon) and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import OptionError
from ..options import MUON_LR_RATIO, TrainConfig
from ..runtime import fused_optimizer


def freeze_parts(spec: str, n_layer: int) -> list[tuple[bool, int]]:
    """--freeze as (embeddings frozen, number of first blocks frozen) per comma-separated part; a part that is
    none of embeddings, blocks:N, all-but:N (N from 0 to n_layer) is refused by name."""
    parts = []
    for part in spec.split(","):
        name, _, arg = part.strip().partition(":")
        if name == "embeddings":
            parts.append((True, 0))
        elif name in ("blocks", "all-but") and arg.isdigit() and int(arg) <= n_layer:
            parts.append((name == "all-but", int(arg) if name == "blocks" else n_layer - int(arg)))
        else:
            raise OptionError(
                f"--freeze {part!r}: expected embeddings, blocks:N or all-but:N with N between 0 and n_layer={n_layer}"
            )
    return parts


def apply_freeze(model: nn.Module, spec: str | None) -> int:
    """Freeze parts of the model for transfer learning; returns the number of frozen parameters.

    `embeddings` freezes wte (and with it the tied output head) and wpe; `blocks:N` the first N blocks;
    `all-but:N` the embeddings and every block but the last N.
    """
    if not spec:
        return 0
    tr = model.transformer
    frozen: list[nn.Module] = []
    for embeddings, blocks in freeze_parts(spec, model.config.n_layer):
        frozen += list(tr.h[:blocks]) + ([tr.wte, tr.wpe] if embeddings else [])
    for module in frozen:
        module.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if not p.requires_grad)


def configure_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight matrices and embeddings are decayed (as GPT-2 and nanoGPT do), biases and LayerNorm are not.
    With `cfg.optimizer == "muon"`, the matrices inside the blocks go to Muon instead (see `Muon`).

    The fused kernel on CUDA, and on the CPU from torch 2.4 (where it exists): there it updates each tensor
    in one multithreaded pass and takes a fraction of the foreach version's time (benchmarks/bench_train.py)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    kind = {"fused": True} if fused_optimizer(device) else {"foreach": True}
    no_decay = {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}
    if cfg.optimizer != "muon":
        decay = {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": cfg.weight_decay}
        return torch.optim.AdamW([decay, no_decay], lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), **kind)
    hidden = [(n, p) for n, p in named if p.dim() == 2 and ".h." in f".{n}"]  # block matrices, not wte/wpe
    ids = {id(p) for _, p in hidden}
    embed = {"params": [p for _, p in named if p.dim() >= 2 and id(p) not in ids], "weight_decay": cfg.weight_decay}
    muon = [
        {"params": [p for n, p in hidden if n.endswith("c_attn.weight")], "muon": True, "split": 3},
        {"params": [p for n, p in hidden if not n.endswith("c_attn.weight")], "muon": True, "split": 1},
    ]
    muon_lr = cfg.muon_lr or MUON_LR_RATIO * cfg.learning_rate  # unset: moves with --lr (options.unset_defaults)
    for group in muon:
        group.update(weight_decay=cfg.weight_decay, lr_ratio=muon_lr / cfg.learning_rate)
    groups = [g for g in (embed, no_decay, *muon) if g["params"]]
    return Muon(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), **kind)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to `g` (or to each of a stack of them), roughly: U V^T of its SVD
    with the singular values brought into about [0.7, 1.2] by a quintic Newton-Schulz iteration whose
    coefficients favour speed of convergence over exactness (a = 3.4445, b = -4.7750, c = 2.0315, the
    values of Keller Jordan's Muon)."""
    x = g / (g.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    wide = x.size(-2) <= x.size(-1)
    x = x if wide else x.mT
    if x.dim() == 2:
        x = x.unsqueeze(0)  # baddbmm wants batches
    for _ in range(steps):  # x <- a x + (b A + c A A) x with A = x x^T; baddbmm folds the scalings into the products
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=-4.7750, alpha=2.0315), x, beta=3.4445)
    x = x.squeeze(0) if g.dim() == 2 else x
    return x if wide else x.mT


class Muon(torch.optim.AdamW):
    """AdamW for the groups it is given, and Muon for those marked `muon=True`: momentum (Nesterov), then the
    update orthogonalised (`orthogonalize`) so that every direction of a weight matrix moves by about as
    much, scaled by sqrt(max(1, rows / cols)), with decoupled weight decay. `split` cuts a matrix into that
    many row blocks orthogonalised one by one (GPT-2's c_attn holds Q, K and V). Each group's learning
    rate is the schedule's times its `lr_ratio`. Muon consumes the gradients of its groups before AdamW
    steps the rest, so one object holds the whole state and checkpoints as any torch optimizer does.
    Matrices of one shape are orthogonalised together, as one batch: on a CPU, small models spend more
    time calling the products than doing them."""

    momentum = 0.95

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self._step_supports_amp_scaling = False  # a gradient scaler unscales first, for both halves

    @torch.no_grad()
    def step(self, closure=None):
        blocks: dict[tuple, list[torch.Tensor]] = {}  # shape -> views into the gradients, updated in place
        todo = []
        for group in self.param_groups:
            if not group.get("muon"):
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # a step count as AdamW keeps one, which its state loading expects of every tensor
                    state.update(step=torch.tensor(0.0), momentum_buffer=torch.zeros_like(p))
                state["step"] += 1
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - self.momentum)
                p.grad.lerp_(buf, self.momentum)  # Nesterov: the gradient, then a step further along
                for part in p.grad.chunk(group["split"]):
                    blocks.setdefault(tuple(part.shape), []).append(part)
                todo.append((p, group))
        for parts in blocks.values():
            for part, update in zip(parts, orthogonalize(torch.stack(parts))):
                part.copy_(update)
        for p, group in todo:
            rows, cols = p.size(0) // group["split"], p.size(1)
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(p.grad, alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5)
            p.grad = None
        return super().step(closure)


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
    elif cfg.schedule == "wsd":  # warmup, stable, then a linear cooldown over the last `cooldown` of the run
        decay = 1 - (1 - floor) * max(0.0, p - (1 - cfg.cooldown)) / max(cfg.cooldown, 1e-9)
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


__all__ = ["Muon", "apply_freeze", "configure_optimizer", "lr_at", "orthogonalize", "warmup_share"]
