"""Training a reward model on preference pairs: the task the Trainer runs (trl's RewardTrainer's pairwise loss,
-log sigmoid(r_chosen - r_rejected)) and pairs to a reward-model folder in one call (`train_reward_model`, behind
`gptforge reward train`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..classify import load_classifier, pad_batch, save_classifier
from ..data.dataset import RunData
from ..data.preferences import PairBatches, Pairs, read_pairs
from ..errors import OptionError
from ..options import InstructOptions, TrainConfig
from .callbacks import Callbacks
from .loop import Trainer, TrainResult
from .preference import disable_dropout
from .runfolder import claim_run_folder, refuse_previous_run
from .tasks import FigureMeans, Task

FIGURES = ("accuracy", "margin", "mean_reward")  # trl's RewardTrainer's names


def reward_loss(rewards: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The pairwise loss of (2n,) rewards, the chosen first, and the batch's figures (0-d tensors)."""
    chosen, rejected = rewards.float().chunk(2)
    loss = -F.logsigmoid(chosen - rejected).mean()
    d = (chosen - rejected).detach()
    return loss, {"accuracy": (d > 0).float().mean(), "margin": d.mean(), "mean_reward": rewards.detach().mean()}


class RewardBatches(PairBatches):
    """(input_ids,): the chosen sequences of a batch of pairs, then their rejected ones, whole, right-padded."""

    def batch(self, step: int):
        seqs, _ = self.examples.sequences(self.indices(step))
        return (pad_batch(seqs, self.pad_id)[0],)


class RewardModelling(Task):
    """The pairwise loss on the rewards of the chosen and rejected answers; evaluated by the share of validation pairs
    ranked the right way (val_accuracy, which picks best/) and the mean margin."""

    metric = "val_accuracy"
    higher_is_better = True

    def __init__(self, train: Pairs, val: Pairs | None, pad_id: int, tokenizer_fingerprint: str = ""):
        self.train, self.val, self.pad_id = train, val, pad_id
        self.data = RunData(train, val, None, train.fingerprint, tokenizer_fingerprint)
        self._figures = FigureMeans(FIGURES)

    def make_batches(self, cfg, block_size: int, rank: int, world_size: int) -> RewardBatches:
        return RewardBatches(self.train, cfg.batch_size, self.pad_id, seed=cfg.seed, rank=rank, world_size=world_size)

    def tokens_per_batch(self, cfg, block_size: int) -> int:
        return max(1, round(cfg.batch_size * self.train.tokens / len(self.train)))

    def loss(self, model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        loss, figs = reward_loss(model(batch[0])[:, 0])
        self._figures.add(figs)
        return loss

    def log_metrics(self) -> dict:
        return self._figures.means()

    @property
    def has_validation(self) -> bool:
        return self.val is not None and len(self.val) > 0

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, *, full: bool, trainer) -> dict:
        was_training, totals, n = model.training, {}, len(self.val)
        model.eval()
        for s in range(0, n, trainer.cfg.batch_size):
            index = list(range(s, min(n, s + trainer.cfg.batch_size)))
            ids = pad_batch(self.val.sequences(index)[0], self.pad_id)[0].to(trainer.device)
            with torch.autocast(trainer.device.type, dtype=trainer.dtype, enabled=trainer.dtype != torch.float32):
                loss, figs = reward_loss(model(ids)[:, 0])
            for k, v in {"loss": loss, **figs}.items():
                totals[k] = totals.get(k, 0.0) + float(v) * len(index)
        model.train(was_training)
        return {f"val_{k}": v / n for k, v in totals.items()} | {"val_pairs": n}

    def describe(self, row: dict) -> str:
        return (
            f"val accuracy {row['val_accuracy']:.4f}, reward margin {row['val_margin']:.4f}, "
            f"loss {row['val_loss']:.4f} ({row['val_pairs']:,} pairs)"
        )

    def save(self, model: torch.nn.Module, folder: Path, tokenizer=None, state_dict: dict | None = None) -> None:
        save_classifier(model, folder, tokenizer, state_dict=state_dict)

    def load(self, model: torch.nn.Module, folder: Path) -> None:
        model.load_state_dict(load_classifier(folder).state_dict())

    def size(self) -> str:
        return f"training pairs: {len(self.train):,} ({self.train.tokens:,} tokens)"


def train_reward_model(
    inputs,
    *,
    init: str | None = None,
    eval_inputs=None,
    instruct: InstructOptions | None = None,
    log: Callable[[str], None] = print,
    **train_options,
) -> TrainResult:
    """Train a reward model on preference pairs (JSON Lines of prompt/chosen/rejected, data.preferences) from the
    language model `init`, and save its folder in `out_dir`. The validation pairs are `eval_inputs`, else a seeded
    tenth of the inputs. `train_options` are TrainConfig fields and train/callbacks.py's callbacks."""
    from ..chat import ChatTemplate, load_template_file, template_of
    from ..reward import build_reward_model
    from ..tokenizer import load_tokenizer
    from .pipeline import load_model_folder

    callbacks = Callbacks.take(train_options)
    cfg = TrainConfig(**train_options)
    if init is None:
        raise OptionError("a reward model starts from a language model: give --init MODEL")
    out = Path(cfg.out_dir)
    refuse_previous_run(out, cfg, init)
    instruct = instruct or InstructOptions()
    with claim_run_folder(out, log):
        tok = load_tokenizer(load_model_folder(init))
        given = load_template_file(instruct.chat_template) if instruct.chat_template else None
        template = ChatTemplate(given or template_of(tok), tok)
        torch.manual_seed(cfg.seed)  # the new head: one reward model per --seed
        model = build_reward_model(init, tok.pad_id)
        disable_dropout(model)  # as trl's RewardTrainer does by default
        block = cfg.block_size or model.config.n_positions
        pairs = read_pairs(inputs, tok, block, template)
        train, val = (
            (pairs, read_pairs(eval_inputs, tok, block, template)) if eval_inputs else pairs.split(0.1, cfg.seed)
        )
        log(f"reward model: {len(train):,} training and {len(val) if val else 0:,} validation pairs")
        task = RewardModelling(train, val, tok.pad_id, tok.fingerprint)
        if cfg.max_steps is None and cfg.epochs is None and cfg.max_time is None:
            cfg = dataclasses.replace(cfg, epochs=1.0)
            log("length: 1 epoch (set --max-steps, --epochs or --max-time)")
        trainer = Trainer(model, task.data, cfg, tokenizer=tok, finetune=True, task=task, callbacks=callbacks)
        return trainer.run()


__all__ = ["RewardBatches", "RewardModelling", "reward_loss", "train_reward_model"]
