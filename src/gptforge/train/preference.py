"""Preference tuning as a Trainer task: DPO (against a reference model) and ORPO (none), on pairs of a chosen and a
rejected answer to the same prompt (`data.preferences`).

The objectives are trl's (DPOTrainer's "sigmoid" loss, ORPOTrainer's odds ratio), on the answer tokens only, and so
are the figures logged: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen,
logps/rejected, in metrics.jsonl every log interval and as val_<name> at every evaluation, whose
val_rewards/accuracies (the share of pairs the model prefers the right way) picks best/.

DPO's reference is the --init model. For a full fine-tune its log-probabilities of every pair are computed once,
before training, and kept in the run folder (`REFERENCE_FILE`, keyed by the data and the model), so a resumed run
reads the very numbers the first one used. With LoRA the reference is the same model with its adapters switched
off, computed alongside each step: no second copy of the weights. Dropout is off, as trl's `disable_dropout`
default has it, so a pair's log-probabilities do not depend on the draw.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..data.dataset import RunData
from ..data.preferences import PairBatches, Pairs, is_preference_file, read_pairs
from ..errors import DataError, OptionError
from ..fsio import atomic_write
from ..options import InstructOptions, PreferenceOptions, TrainConfig
from .tasks import FigureMeans, Task

REFERENCE_FILE = "reference_logps.safetensors"  # DPO: the reference's log-probabilities of each pair
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


# --- the objectives -----------------------------------------------------------------------------------------


def sequence_logps(model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the summed log-probability of the labelled tokens (y != -100) and their count. A bare model scores
    only the answer positions (their logits alone); a wrapped one (DDP, compiled) goes through its forward."""
    keep = y != -100
    if hasattr(model, "hidden") and hasattr(model, "lm_head"):
        hidden = model.hidden(x)[keep]
        logits = model.lm_head(hidden).float()
        rows = keep.nonzero()[:, 0]
    else:
        logits = model(x)[0][keep].float()
        rows = keep.nonzero()[:, 0]
    token = logits.gather(1, y[keep][:, None]).squeeze(1) - logits.logsumexp(-1)
    sums = torch.zeros(x.size(0), device=x.device, dtype=torch.float32).index_add(0, rows, token)
    return sums, keep.sum(1)


def dpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict]:
    """DPO's loss, -log sigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))) averaged over the pairs,
    from summed answer log-probabilities; and trl's figures of the batch (tensors)."""
    chosen_rewards = beta * (chosen - ref_chosen)
    rejected_rewards = beta * (rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, figures(chosen_rewards.detach(), rejected_rewards.detach(), chosen.detach(), rejected.detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, nll: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict]:
    """ORPO's loss from the answers' mean token log-probabilities: the chosen answers' cross-entropy `nll` minus
    beta times log sigmoid of the log odds ratio of chosen over rejected; rewards are beta x the mean
    log-probabilities (as trl's ORPOTrainer logs them)."""
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    loss = nll - beta * F.logsigmoid(log_odds).mean()
    c, r = chosen_mean.detach(), rejected_mean.detach()
    return loss, figures(beta * c, beta * r, c, r)


def figures(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    """trl's logged figures of a batch, as 0-d tensors (no host sync)."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": chosen_logps.mean(),
        "logps/rejected": rejected_logps.mean(),
    }


# --- the reference --------------------------------------------------------------------------------------


def adapters_off(model) -> contextlib.AbstractContextManager:
    """The model with its LoRA adapters contributing nothing for the duration (the base model's outputs)."""
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")]

    @contextlib.contextmanager
    def off():
        saved = [m.scaling for m in layers]
        try:
            for m in layers:
                m.scaling = 0.0
            yield
        finally:
            for m, s in zip(layers, saved):
                m.scaling = s

    return off()


def disable_dropout(model) -> None:
    """Every dropout of the model off (trl's `disable_dropout`), its config left as it is (the saved folder keeps
    it)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "attn_dropout"):
            m.attn_dropout = 0.0


@torch.no_grad()
def pair_logps(model, pairs: Pairs, batch_size: int, pad_id: int, device, dtype=torch.float32, count=None):
    """(summed answer log-probabilities, answer token counts) of each pair's chosen and rejected sequences, as
    (n, 2) float32 / int64 tensors on the CPU, batches of similar lengths together; `count`: the first pairs only."""
    n = len(pairs) if count is None else count
    order = sorted(range(n), key=lambda i: len(pairs.chosen[i]) + len(pairs.rejected[i]))
    logps, counts = torch.zeros(n, 2), torch.zeros(n, 2, dtype=torch.int64)
    was_training = model.training
    model.eval()
    for s in range(0, n, batch_size):
        rows = order[s : s + batch_size]
        x, y, _ = pairs.batch(rows, pad_id)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            sums, k = sequence_logps(model, x.to(device), y.to(device))
        logps[rows] = sums.float().cpu().view(2, -1).t()
        counts[rows] = k.cpu().view(2, -1).t()
    model.train(was_training)
    return logps, counts


def cached_reference(model, pairs: dict, cfg: TrainConfig, out: Path, pad_id: int, log) -> dict:
    """Each split's reference log-probabilities, (n, 2) tensors: read from the run folder's REFERENCE_FILE when it
    was made from this data and this model, else computed now and written there (rank 0)."""
    from safetensors.torch import load_file, save_file

    from ..adapters import base_fingerprint
    from ..runtime import pick_precision, resolve_device

    device = resolve_device(cfg.device)
    dtype = pick_precision(cfg.precision, device)
    key = json.dumps(
        {k: p.fingerprint for k, p in pairs.items()}
        | {"model": base_fingerprint(model), "dtype": str(dtype), "lengths": [len(p) for p in pairs.values()]},
        sort_keys=True,
    )
    key = hashlib.sha256(key.encode()).hexdigest()[:20]
    file = out / REFERENCE_FILE
    if file.is_file():
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            from safetensors import safe_open

            with safe_open(str(file), "pt") as f:
                same = (f.metadata() or {}).get("key") == key
            if same:
                log(f"DPO reference: the log-probabilities kept in {file}")
                return load_file(str(file))
    model.to(device)
    log(f"DPO reference: computing the --init model's log-probabilities of {sum(map(len, pairs.values())):,} pairs")
    ref = {name: pair_logps(model, p, cfg.batch_size, pad_id, device, dtype)[0] for name, p in pairs.items()}
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(file, lambda tmp: save_file(ref, str(tmp), metadata={"key": key}))
    return ref


# --- the task -----------------------------------------------------------------------------------------------


class PreferenceTuning(Task):
    """DPO or ORPO on preference pairs; evaluated by the validation pairs' loss and trl's figures, the best model
    being the one that prefers the most validation pairs the right way."""

    metric = "val_rewards/accuracies"
    higher_is_better = True

    def __init__(self, train: Pairs, val: Pairs | None, pad_id: int, options: PreferenceOptions, reference=None):
        self.train, self.val, self.pad_id = train, val, pad_id
        self.method, self.beta = options.preference or "dpo", options.beta
        self.reference = reference  # {"train": (n, 2), "val": (n, 2)} cached; None: the adapters switched off
        self.data = RunData(train, val, None, train.fingerprint, "")
        self.options = {"--preference": self.method, "--beta": self.beta}
        self._figures = FigureMeans(METRICS)
        self._on_device: dict = {}

    def make_batches(self, cfg, block_size: int, rank: int, world_size: int) -> PairBatches:
        return PairBatches(self.train, cfg.batch_size, self.pad_id, seed=cfg.seed, rank=rank, world_size=world_size)

    def tokens_per_batch(self, cfg, block_size: int) -> int:
        return max(1, round(cfg.batch_size * self.train.tokens / len(self.train)))

    def _reference_of(self, split: str, index: torch.Tensor, model, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference is not None:
            table = self._on_device.get(split)
            if table is None or table.device != index.device:
                table = self._on_device[split] = self.reference[split].to(index.device)
            return table[index, 0], table[index, 1]
        bare = getattr(model, "module", model)  # the reference needs no gradient sync
        with torch.no_grad(), adapters_off(bare):
            sums, _ = sequence_logps(bare, x, y)
        return sums.chunk(2)

    def objective(self, model, batch: tuple, split: str) -> tuple[torch.Tensor, dict]:
        x, y, index = batch
        sums, counts = sequence_logps(model, x, y)
        chosen, rejected = sums.chunk(2)
        if self.method == "orpo":
            n_chosen, n_rejected = counts.chunk(2)
            nll = -chosen.sum() / n_chosen.sum().clamp(min=1)
            return orpo_loss(chosen / n_chosen.clamp(min=1), rejected / n_rejected.clamp(min=1), nll, self.beta)
        ref_chosen, ref_rejected = self._reference_of(split, index, model, x, y)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)

    def loss(self, model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        loss, figs = self.objective(model, batch, "train")
        self._figures.add(figs)
        return loss

    def log_metrics(self) -> dict:
        """The mean of each figure over the micro-steps since the last call (one host sync)."""
        return self._figures.means()

    @property
    def has_validation(self) -> bool:
        return self.val is not None and len(self.val) > 0

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, *, full: bool, trainer) -> dict:
        n = len(self.val)
        if not full and trainer.cfg.eval_tokens:  # the first pairs up to about --eval-tokens tokens
            sizes = torch.tensor([len(c) + len(r) for c, r in zip(self.val.chosen, self.val.rejected)]).cumsum(0)
            n = max(1, int((sizes < trainer.cfg.eval_tokens).sum()) + 1)
            n = min(n, len(self.val))
        was_training = model.training
        model.eval()
        totals, size = {}, trainer.cfg.batch_size
        device = trainer.device
        for s in range(0, n, size):
            index = list(range(s, min(n, s + size)))
            batch = tuple(t.to(device) for t in self.val.batch(index, self.pad_id))
            with torch.autocast(device.type, dtype=trainer.dtype, enabled=trainer.dtype != torch.float32):
                loss, figs = self.objective(model, batch, "val")
            for k, v in {"loss": loss, **figs}.items():
                totals[k] = totals.get(k, 0.0) + float(v) * len(index)
        model.train(was_training)
        return {f"val_{k}": v / n for k, v in totals.items()} | {"val_pairs": n}

    def describe(self, row: dict) -> str:
        return (
            f"val preference accuracy {row['val_rewards/accuracies']:.4f}, reward margin "
            f"{row['val_rewards/margins']:.4f}, loss {row['val_loss']:.4f} ({row['val_pairs']:,} pairs)"
        )

    def size(self) -> str:
        return f"training pairs: {len(self.train):,} ({self.train.tokens:,} tokens)"


# --- files to a task ---------------------------------------------------------------------------------------


def preference_inputs(inputs, eval_inputs, preference: PreferenceOptions | None) -> bool:
    """Whether a run trains on preference pairs: --preference is given (then every input must be pairs), or the
    inputs are pairs (then --preference must be given)."""
    files = [Path(str(i)) for i in inputs or [] if isinstance(i, (str, Path))]
    found = [is_preference_file(f) for f in files]
    asked = preference is not None and preference.preference is not None
    if not asked:
        if found and all(found):
            raise OptionError(
                f"{files[0]}: holds preference pairs (prompt/chosen/rejected); say how to train on them: "
                "--preference dpo or --preference orpo"
            )
        return False
    bad = [str(f) for f, ok in zip(files, found) if not ok] + [
        str(e) for e in eval_inputs or [] if not is_preference_file(e)
    ]
    if bad or not files or len(files) != len(inputs):
        raise DataError(
            f"{bad[0] if bad else 'the inputs'}: --preference trains on JSON Lines of preference pairs "
            '({"prompt": ..., "chosen": ..., "rejected": ...}), one per line'
        )
    return True


def preference_task(
    inputs,
    eval_inputs,
    tokenizer,
    model,
    cfg: TrainConfig,
    options: PreferenceOptions,
    instruct: InstructOptions | None = None,
    lora: bool = False,
    log: Callable[[str], None] = print,
) -> PreferenceTuning:
    """Read and check the pairs, turn dropout off, and (DPO, full fine-tune) compute or read the reference's
    log-probabilities; all before training starts, on the --init model."""
    from ..chat import ChatTemplate, load_template_file, template_of

    instruct = instruct or InstructOptions()
    if instruct.train_on_prompt:
        raise OptionError("--train-on-prompt is for instruction data; preference pairs train on the answers only")
    given = load_template_file(instruct.chat_template) if instruct.chat_template else None
    source = given or template_of(tokenizer)
    template = ChatTemplate(
        source, tokenizer, f"--chat-template {instruct.chat_template}" if given else "the chat template"
    )
    block = cfg.block_size or model.config.n_positions
    pairs = read_pairs(inputs, tokenizer, block + 1, template)
    train, val = (
        (pairs, read_pairs(eval_inputs, tokenizer, block + 1, template)) if eval_inputs else pairs.split(0.1, cfg.seed)
    )
    if pairs.truncated:
        log(f"warning: {pairs.truncated} pair(s) were longer than the context of {block} tokens; their answers are cut")
    disable_dropout(model)
    reference = None
    if options.preference == "dpo" and not lora:
        splits = {"train": train} | ({"val": val} if val is not None else {})
        reference = cached_reference(model, splits, cfg, Path(cfg.out_dir), tokenizer.pad_id, log)
    how = {"dpo": f"DPO, beta {options.beta:g}", "orpo": f"ORPO, beta {options.beta:g}"}[options.preference]
    ref = "" if options.preference != "dpo" else ("; reference: the base without the adapter" if lora else "")
    log(f"preference pairs: {len(train):,} training and {len(val) if val else 0:,} validation; {how}{ref}")
    tokenizer.meta["chat_template"] = source
    task = PreferenceTuning(train, val, tokenizer.pad_id, options, reference)
    task.data = RunData(train, val, None, train.fingerprint, tokenizer.fingerprint)
    task.options |= {"--chat-template": hashlib.sha256(source.encode()).hexdigest()[:12]}
    return task


__all__ = [
    "METRICS",
    "PreferenceTuning",
    "REFERENCE_FILE",
    "adapters_off",
    "disable_dropout",
    "dpo_loss",
    "orpo_loss",
    "pair_logps",
    "preference_inputs",
    "preference_task",
    "sequence_logps",
]
