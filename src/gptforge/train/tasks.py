"""What a Trainer trains: a task gives the batches, the loss of one batch, the evaluation, and the folder
that is saved. Language modelling is the default task; classification and instruction tuning are others.

A task's batches must be a pure function of the step (`batches.batch(step)` returns a tuple of tensors),
so that a resumed run draws exactly the batches it would have drawn; `data.batches.Prefetcher` moves them
to the device in the background. The evaluation row holds `task.metric`, which picks the best model
(`higher_is_better` says which way).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import load_trained, save_trained
from ..data.batches import Batches
from ..data.dataset import RunData
from ..evaluate import bits_per_byte, evaluate_tokens


class FigureMeans:
    """Figures of the training micro-steps (tensors, kept on the device) summed until a log row asks for their
    means: one host sync per log interval, not per step."""

    def __init__(self, names: tuple[str, ...]):
        self.names, self.sums, self.steps = names, {}, 0

    def add(self, figures: dict) -> None:
        for k, v in figures.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.steps += 1

    def means(self) -> dict:
        if not self.steps:
            return {}
        values = torch.stack([self.sums[k] for k in self.names]).float().cpu().tolist()
        row = {k: v / self.steps for k, v in zip(self.names, values)}
        self.sums, self.steps = {}, 0
        return row


class Task:
    """The interface; see LanguageModelling for the reference implementation."""

    metric = "val_loss"
    higher_is_better = False
    can_sample = False  # whether text samples during training make sense
    options: dict = {}  # flag -> value of the task's own training options; a resumed run must give the same

    def make_batches(self, cfg, block_size: int, rank: int, world_size: int):
        """An object with `batch(step) -> tuple of tensors` and `steps_per_epoch`."""
        raise NotImplementedError

    def tokens_per_batch(self, cfg, block_size: int) -> int:
        return cfg.batch_size * block_size

    def loss(self, model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        raise NotImplementedError

    def log_metrics(self) -> dict:
        """Figures of the training batches since the last call, added to each log row (a host sync is allowed:
        it runs once per log interval)."""
        return {}

    @property
    def has_validation(self) -> bool:
        return False

    def evaluate(self, model: torch.nn.Module, *, full: bool, trainer) -> dict:
        """Validation figures (keys start with `val_`), including `self.metric`."""
        raise NotImplementedError

    def describe(self, row: dict) -> str:
        return f"{self.metric} {row[self.metric]:.4f}"

    def better(self, score: float, than: float) -> bool:
        """Whether validation `score` beats `than` (which way follows `higher_is_better`)."""
        return score > than if self.higher_is_better else score < than

    def save(self, model: torch.nn.Module, folder: Path, tokenizer=None, state_dict: dict | None = None) -> None:
        """Write the model folder (into `folder`, which exists); for a model with LoRA layers, the adapter alone."""
        save_trained(model, folder, tokenizer, state_dict=state_dict)

    def load(self, model: torch.nn.Module, folder: Path) -> None:
        """Put the weights `save` wrote into `folder` back into `model` (resuming a run)."""
        load_trained(model, folder)

    def size(self) -> str:
        """What the training data holds, in words."""
        return ""


class LanguageModelling(Task):
    """Next-token prediction on windows of a prepared token stream; evaluated by loss, perplexity and bits
    per byte on the validation split."""

    can_sample = True

    def __init__(self, data: RunData):
        self.data = data

    def make_batches(self, cfg, block_size: int, rank: int, world_size: int) -> Batches:
        return Batches(
            self.data.train,
            block_size,
            cfg.batch_size,
            mode=cfg.batch_mode,
            stride=cfg.stride,
            seed=cfg.seed,
            rank=rank,
            world_size=world_size,
        )

    def loss(self, model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        x, y = batch
        return model(x, y)[1]

    @property
    def has_validation(self) -> bool:
        return self.data.val is not None

    def evaluate(self, model: torch.nn.Module, *, full: bool, trainer) -> dict:
        res = evaluate_tokens(
            model,
            self.data.val,
            block_size=trainer.block_size,
            batch_size=trainer.cfg.batch_size,
            max_tokens=None if full else trainer.cfg.eval_tokens,
            device=trainer.device,
            autocast_dtype=trainer.dtype if trainer.dtype != torch.float32 else None,
        )
        return {
            "val_loss": res.loss,
            "val_perplexity": res.perplexity,
            "val_bits_per_byte": bits_per_byte(res.loss, self.data.bytes_per_token),
            "val_tokens": res.tokens,
        }

    def describe(self, row: dict) -> str:
        bpb = row.get("val_bits_per_byte")
        return f"val loss {row['val_loss']:.4f}, perplexity {row['val_perplexity']:.2f}" + (
            f", {bpb:.4f} bits/byte" if bpb is not None else ""
        )

    def size(self) -> str:
        return f"training tokens: {len(self.data.train):,}"


__all__ = ["LanguageModelling", "Task"]
