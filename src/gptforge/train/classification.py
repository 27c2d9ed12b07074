"""Training a text classifier: the classification task the Trainer runs, and labelled files to a trained
classifier folder in one call (`train_classifier`, behind `gptforge classify train`)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..adapters import has_lora, lora_state_dict, merge_lora
from ..classify import (
    build_classifier,
    cut,
    encode_texts,
    format_metrics,
    load_classifier,
    metrics_of,
    pad_batch,
    probabilities,
    save_classifier,
    set_dropout,
)
from ..config import is_preset
from ..data.dataset import RunData
from ..data.labelled import Labelled, check_classes, check_known, read_labelled, stratified_split
from ..errors import OptionError, RunFolderError
from ..fsio import write_text
from ..options import DEFAULT_VOCAB_SIZE, ClassifyOptions, LoRAOptions, TrainConfig, flag_of
from .callbacks import Callbacks
from .finetune import add_lora
from .loop import Trainer, TrainResult
from .runfolder import claim_run_folder, refuse_previous_run, resume_after_restart, resume_tokenizer
from .tasks import Task

# TrainConfig fields that mean nothing for classification: refused when set, never silently ignored
LANGUAGE_MODELLING_ONLY = ("batch_mode", "stride", "eval_tokens", "sample_interval", "sample_prompt", "sample_tokens")
LORA_STATE = "classifier_lora.safetensors"  # LoRA runs: the adapters and the head, for --resume
BUCKET = 32  # batches whose examples are drawn together and sorted by length, so a batch holds similar lengths


class LabelledBatches:
    """Batches of (input_ids right-padded to the batch's longest, label ids), a pure function of the step.

    Each epoch visits every example once in a seeded order; `balanced` draws every class equally often
    instead (with replacement). Examples are drawn BUCKET batches at a time and sorted by length within the
    draw, so that a batch wastes little on padding; the batches of a draw come in a seeded order. `crop` is
    the share of rows given as a random contiguous span of at least half their tokens (augmentation)."""

    def __init__(
        self,
        seqs: Sequence[np.ndarray],
        labels: np.ndarray,
        batch_size: int,
        pad_token_id: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        balanced: bool = False,
        crop: float = 0.0,
    ):
        self.seqs, self.labels, self.pad, self.crop = seqs, labels, pad_token_id, crop
        self.batch_size, self.seed, self.rank, self.world_size, self.balanced = (
            batch_size,
            seed,
            rank,
            world_size,
            balanced,
        )
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = max(1, len(seqs) // self.global_batch)
        self.lengths = np.array([len(s) for s in seqs])
        if balanced:
            counts = np.bincount(labels)
            self.weights = (1.0 / counts[labels]) / (counts > 0).sum()

    def _draw(self, epoch: int, bucket: int) -> np.ndarray:
        """The example indices of one draw of BUCKET global batches, sorted by length."""
        rng = np.random.default_rng([self.seed, epoch, bucket])
        n = BUCKET * self.global_batch
        if self.balanced:
            idx = rng.choice(len(self.seqs), size=n, p=self.weights)
        else:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.seqs))
            if len(order) < self.global_batch:  # fewer examples than one batch: repeat them
                order = np.resize(order, self.global_batch)
            idx = order[bucket * n : (bucket + 1) * n]
        return idx[np.argsort(self.lengths[idx], kind="stable")]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = divmod(step, self.steps_per_epoch)
        bucket, j = divmod(i, BUCKET)
        idx = self._draw(epoch, bucket)
        which = np.random.default_rng([self.seed, epoch, bucket, 1]).permutation(max(1, len(idx) // self.global_batch))
        rows = idx[which[j % len(which)] * self.global_batch :][: self.global_batch]  # full batches only
        rows = rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        seqs = [self.seqs[r] for r in rows]
        if self.crop:
            rng = np.random.default_rng([self.seed, step, self.rank, 2])
            seqs = [random_span(s, rng) if rng.random() < self.crop else s for s in seqs]
        ids, _ = pad_batch(seqs, self.pad)
        return ids, torch.from_numpy(self.labels[rows].astype(np.int64))


def random_span(seq: np.ndarray, rng: np.random.Generator, shortest: int = 8) -> np.ndarray:
    """A contiguous span of `seq` of at least half its tokens, uniformly placed (sequences of `shortest` tokens
    or fewer come back whole)."""
    if len(seq) <= shortest:
        return seq
    n = int(rng.integers(len(seq) // 2, len(seq) + 1))
    start = int(rng.integers(0, len(seq) - n + 1))
    return seq[start : start + n]


class ClassificationTask(Task):
    """Cross-entropy on the label of each text (optionally weighted by inverse class frequency); evaluated by
    macro-F1 on the validation examples, which picks the best model."""

    metric = "val_macro_f1"
    higher_is_better = True

    def __init__(
        self,
        train: tuple[list, np.ndarray],
        val: tuple[list, np.ndarray] | None,
        labels: list[str],
        pad_token_id: int,
        balance: str = "none",
        fingerprint: str = "",
        tokenizer_fingerprint: str = "",
        lm_weight: float = 0.0,
        crop: float = 0.0,
        compute_metrics: Callable | None = None,
    ):
        self.train, self.val, self.labels, self.pad, self.balance = train, val, labels, pad_token_id, balance
        self.compute_metrics = compute_metrics
        self.lm_weight, self.crop = lm_weight, crop
        self.options = {
            flag_of(ClassifyOptions, k): v for k, v in dict(balance=balance, lm_weight=lm_weight, crop=crop).items()
        }
        self.report: dict | None = None  # the latest evaluation in full: per class, confusion matrix
        counts = np.bincount(train[1], minlength=len(labels)).astype(float)
        self.class_weights = (
            torch.tensor(counts.sum() / (len(labels) * np.maximum(counts, 1)), dtype=torch.float32)
            if balance == "weights"
            else None
        )
        # what the Trainer checks a resumed run against: the examples and the tokenizer
        self.data = RunData(None, None, None, fingerprint, tokenizer_fingerprint)
        self.mean_tokens = float(np.mean([len(s) for s in train[0]]))

    def make_batches(self, cfg, block_size: int, rank: int, world_size: int) -> LabelledBatches:
        return LabelledBatches(
            self.train[0],
            self.train[1],
            cfg.batch_size,
            self.pad,
            seed=cfg.seed,
            rank=rank,
            world_size=world_size,
            balanced=self.balance == "sampling",
            crop=self.crop,
        )

    def tokens_per_batch(self, cfg, block_size: int) -> int:
        return max(1, round(cfg.batch_size * self.mean_tokens))

    def loss(self, model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        ids, y = batch
        weight = self.class_weights.to(ids.device) if self.class_weights is not None else None
        if not self.lm_weight:
            return F.cross_entropy(model(ids).float(), y, weight=weight)
        logits, lm_loss = model(ids, lm_loss=True)
        return F.cross_entropy(logits.float(), y, weight=weight) + self.lm_weight * lm_loss

    @property
    def has_validation(self) -> bool:
        return self.val is not None and len(self.val[0]) > 0

    def evaluate(self, model: torch.nn.Module, *, full: bool, trainer) -> dict:
        probs = probabilities(model, self.val[0], trainer.cfg.batch_size)
        m = self.report = metrics_of(probs, self.val[1].tolist(), self.labels)
        row = {
            "val_loss": m["loss"],
            "val_accuracy": m["accuracy"],
            "val_macro_f1": m["macro_f1"],
            "val_examples": m["examples"],
        }
        return {**row, **self._own_metrics(probs)}

    def _own_metrics(self, probs: torch.Tensor) -> dict:
        """What the user's compute_metrics(probabilities, label_ids) returns, as val_<name> numbers."""
        if self.compute_metrics is None:
            return {}
        got = self.compute_metrics(probs.float().cpu().numpy(), np.asarray(self.val[1]))
        if not isinstance(got, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in got.values()
        ):
            raise OptionError(f"compute_metrics returned {got!r}: it must return a dict of names to numbers")
        return {k if k.startswith("val_") else f"val_{k}": float(v) for k, v in got.items()}

    def describe(self, row: dict) -> str:
        return f"val macro-F1 {row['val_macro_f1']:.4f}, accuracy {row['val_accuracy']:.4f}, loss {row['val_loss']:.4f}"

    def save(self, model: torch.nn.Module, folder: Path, tokenizer=None, state_dict: dict | None = None) -> None:
        """The classifier folder. With LoRA, the adapters are merged into a copy (an adapter folder cannot hold the new
        head), and the adapters and the head are also kept in LORA_STATE, from which --resume continues exactly."""
        if has_lora(model):
            tensors = {**lora_state_dict(model), "score.weight": model.score.weight.detach().cpu().contiguous()}
            save_file(tensors, str(folder / LORA_STATE))
            model, state_dict = merge_lora(copy.deepcopy(model)), None
        save_classifier(model, folder, tokenizer, state_dict=state_dict)

    def load(self, model: torch.nn.Module, folder: Path) -> None:
        if not has_lora(model):
            model.load_state_dict(load_classifier(folder).state_dict())
            return
        if not (folder / LORA_STATE).is_file():
            raise RunFolderError(
                f"{folder}: no {LORA_STATE}; this checkpoint was not trained with --lora-r, resume without it"
            )
        tensors = load_file(str(folder / LORA_STATE))
        missing = set(lora_state_dict(model)) - set(tensors)
        if missing:
            raise RunFolderError(
                f"{folder}: its adapters cover other layers than --lora-targets; resume with the run's options"
            )
        model.load_state_dict(tensors, strict=False)

    def size(self) -> str:
        return f"training examples: {len(self.train[0]):,} in {len(self.labels)} classes"


# --- labelled files to a classifier --------------------------------------------------------------------------


def _fingerprint(data: Labelled) -> str:
    h = hashlib.blake2b(digest_size=16)
    for text, label in zip(data.texts, data.labels):
        h.update(json.dumps([text, label]).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _tokenizer_for(init: str, out: Path, tokenizer, texts: list[str], vocab_size, resume: bool, log):
    """The tokenizer of a classifier run: the one named, the init model's, or (from scratch) one trained on the
    training texts into `out/tokenizer` (a resumed run reuses its own)."""
    from ..data.vocabulary import train_tokenizer
    from ..tokenizer import load_tokenizer
    from .pipeline import load_model_folder

    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if not is_preset(init):
        return load_tokenizer(load_model_folder(init))
    saved = resume_tokenizer(out) if resume else None  # a resumed run keeps its own
    if saved is not None:
        return load_tokenizer(saved)
    log(f"training a BPE tokenizer on the {len(texts):,} training texts -> {out / 'tokenizer'}")
    return train_tokenizer([], vocab_size=vocab_size or DEFAULT_VOCAB_SIZE, texts=texts, out_dir=out / "tokenizer")


def _split(train: Labelled, eval_inputs, opts: ClassifyOptions, seed: int, read) -> tuple[Labelled, Labelled | None]:
    if eval_inputs:
        return train, read(eval_inputs)
    if opts.val_fraction == 0:
        return train, None
    keep, val = stratified_split(train.labels, opts.val_fraction, seed)
    return train.subset(keep), train.subset(val)


def _refuse(cfg: TrainConfig, init, compute_metrics) -> None:
    """A classifier run's options that cannot work, refused before anything is read."""
    if compute_metrics is not None and not callable(compute_metrics):
        raise OptionError(f"compute_metrics={compute_metrics!r}: must be a function of (probabilities, label_ids)")
    unused = [
        flag_of(TrainConfig, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name in LANGUAGE_MODELLING_ONLY and getattr(cfg, f.name) != f.default
    ]
    if unused:
        raise OptionError(
            f"{', '.join(unused)}: only for language modelling; a classifier trains on whole examples "
            "and samples no text, so leave it out"
        )
    if init is None:
        raise OptionError(
            "say what to start from: --init a language-model folder or hub id (e.g. gpt2), a classifier "
            "folder to train further, or a preset (tiny, mini, small) to train from scratch"
        )


def _model_and_task(init, labels, tok, train_data, val_data, opts, cfg, lora, compute_metrics, log):
    """The classifier (a new head drawn from --seed, dropout and LoRA as asked) and its task over the encoded
    examples; the TrainConfig comes back changed where LoRA changes it."""
    torch.manual_seed(cfg.seed)  # before the new head (or a preset's weights) is drawn: one classifier per --seed
    model = build_classifier(init, labels, tok.pad_id, tok.vocab_size)
    labels = model.labels  # a classifier trained further keeps its label ids
    if opts.dropout is not None:
        set_dropout(model, opts.dropout)
    if val_data is not None:
        check_known(val_data, labels, "the validation examples must use the training labels")
    if lora is not None and lora.enabled:
        cfg = add_lora(model, lora, cfg, None if is_preset(init) else init, log)
        model.score.requires_grad_(True)  # the new head trains in full
    max_length = cfg.block_size or model.config.n_positions
    encode = lambda d, say=None: _encode(tok, d, labels, max_length, opts.truncate, say)
    task = ClassificationTask(
        encode(train_data, log),
        encode(val_data) if val_data is not None else None,
        labels,
        model.pad_token_id,
        opts.balance,
        _fingerprint(train_data),
        getattr(tok, "fingerprint", ""),
        opts.lm_weight,
        opts.crop,
        compute_metrics,
    )
    return model, task, cfg


def train_classifier(
    inputs,
    *,
    init: str | None = None,
    eval_inputs=None,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    options: ClassifyOptions | None = None,
    encoding_errors: str = "strict",
    lora: LoRAOptions | None = None,
    log: Callable[[str], None] = print,
    on_step: Callable[[Trainer], None] | None = None,
    compute_metrics: Callable | None = None,
    **train_options,
) -> TrainResult:
    """Train a classifier on labelled files (see data.labelled.read_labelled) and save its folder in `out_dir`.

    `init` is a language-model folder or hub id (its body, a new head), a classification folder (continue
    training it), or a preset name (from scratch, with a tokenizer trained on the training texts unless
    `tokenizer` names one). The validation examples are `eval_inputs`, else a stratified share of the
    inputs. `train_options` are TrainConfig fields (`block_size` is the longest input kept; default: the
    context). The result's `validation` row holds the final accuracy and macro-F1; the full report (per
    class, confusion matrix) is written to `out_dir/val_metrics.json` and printed. `lora` trains LoRA adapters on
    the frozen body and the head in full; the folders hold the merged classifier. `on_step(trainer)` is called
    after every optimizer step, and the other callbacks of train/callbacks.py (on_log, on_evaluate, on_save) are
    taken too. `compute_metrics(probabilities, label_ids)` (numpy arrays: examples x classes, and the true label
    ids) returns a dict of numbers added to each evaluation's row as val_<name> (as the Trainer's hook does)."""
    callbacks = Callbacks.take(train_options)
    callbacks.on_step = callbacks.on_step or on_step
    opts = options or ClassifyOptions()
    cfg = resume_after_restart(TrainConfig(**train_options))
    _refuse(cfg, init, compute_metrics)
    out = Path(cfg.out_dir)
    refuse_previous_run(out, cfg, None if is_preset(init) else init)
    read = functools.partial(
        read_labelled,
        text_field=opts.text_field,
        label_field=opts.label_field,
        header=opts.header,
        encoding_errors=encoding_errors,
    )
    train_data = read(inputs)
    labels = check_classes(train_data, ", ".join(map(str, [inputs] if isinstance(inputs, (str, Path)) else inputs)))
    train_data, val_data = _split(train_data, eval_inputs, opts, cfg.seed, read)
    with claim_run_folder(out, log):
        tok = _tokenizer_for(init, out, tokenizer, train_data.texts, vocab_size, cfg.resume, log)
        model, task, cfg = _model_and_task(
            init, labels, tok, train_data, val_data, opts, cfg, lora, compute_metrics, log
        )
        counts = ", ".join(f"{k} {v}" for k, v in sorted(train_data.counts().items()))
        log(
            f"classes: {counts}"
            + (f"; validation: {len(val_data):,} examples" if val_data is not None else "; no validation")
        )
        if cfg.max_steps is None and cfg.epochs is None and cfg.max_time is None:
            cfg = dataclasses.replace(cfg, epochs=3.0)
            log("length: 3 epochs (set --max-steps, --epochs or --max-time)")
        trainer = Trainer(
            model, task.data, cfg, tokenizer=tok, finetune=not is_preset(init), task=task, callbacks=callbacks
        )
        result = trainer.run()
    if task.report is not None and not result.interrupted:  # the final evaluation's, in full
        write_text(out / "val_metrics.json", json.dumps(task.report, indent=2) + "\n")
        log(format_metrics(task.report))
    return result


def _encode(
    tok, data: Labelled, labels: list[str], max_length: int, truncate: str, log=None
) -> tuple[list, np.ndarray]:
    """Token ids cut to the context, and label ids; `log` hears how many texts were cut (a classifier reads only
    what fits: on fortunes_topics a 64-token context cut 28% of the texts, and 256 scored better)."""
    index = {name: i for i, name in enumerate(labels)}
    seqs = encode_texts(tok, data.texts, None, truncate, data.where)
    longer = sum(len(s) > max_length for s in seqs)
    if longer and log is not None:
        kept = "start" if truncate == "right" else "end"
        log(
            f"{longer:,} of {len(seqs):,} training texts are longer than the context ({max_length} tokens) and are cut "
            f"to their {kept} (--truncate); a longer --block-size, or a model with a longer context, reads them whole"
        )
    return [cut(s, max_length, truncate) for s in seqs], np.array([index[y] for y in data.labels])


__all__ = ["ClassificationTask", "LabelledBatches", "random_span", "train_classifier"]
