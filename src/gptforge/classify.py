"""Text classification with a GPT-2 body: the model, its folders, prediction and the metrics.

The classifier is transformers' GPT2ForSequenceClassification: the GPT-2 body, then a linear `score` head
(no bias) on the hidden state of each text's last real token. That token is found as transformers finds
it, the rightmost id that is not `pad_token_id`, so a folder saved here opens there
(`AutoModelForSequenceClassification`, `pipeline("text-classification")`) with the same logits, and one
written there opens here. The folder is a GPT-2 folder whose config.json also holds `architectures:
["GPT2ForSequenceClassification"]`, `num_labels`, `id2label`, `label2id` and `pad_token_id`, and whose
weights hold `score.weight` and no LM head.

Padding: given an attention mask, each row's real tokens are moved to the front before the body runs, so
positions count real tokens only and a left-padded batch gives the logits of the right-padded one (and of
each text alone). transformers agrees for right padding, its tokenizer's default; for left padding it
numbers the positions from the first pad unless given `position_ids`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import from_hf_state_dict, read_state_dict, resolve_model_path, save_model
from .config import GPTConfig, is_preset, preset
from .errors import CheckpointError, DataError, OptionError
from .fsio import atomic_write, folder_of
from .kernels import linear_cross_entropy
from .model import GPT

ARCHITECTURE = "GPT2ForSequenceClassification"
TRUNCATE = ("right", "left")  # right: keep the start of a long text; left: keep its end


# --- the model ------------------------------------------------------------------------------------------


def classifier_config(config: GPTConfig, labels: Sequence[str], pad_token_id: int) -> GPTConfig:
    """A copy of `config` that describes a classifier of `labels` (in id order) padded with `pad_token_id`; one
    label is a model with one output, a score (a reward model: transformers' "regression" problem type)."""
    labels = [str(label) for label in labels]
    if len(set(labels)) != len(labels) or not labels:
        raise OptionError(f"labels {labels}: a classifier needs distinct labels")
    extra = {k: v for k, v in config.extra.items() if k not in ("architectures", "problem_type")}
    extra.update(
        num_labels=len(labels),
        id2label={str(i): name for i, name in enumerate(labels)},
        label2id={name: i for i, name in enumerate(labels)},
        pad_token_id=int(pad_token_id),
        problem_type="regression" if len(labels) == 1 else "single_label_classification",
    )
    return dataclasses.replace(config, extra=extra)


def labels_of(config: GPTConfig) -> list[str] | None:
    """The labels of a classifier config in id order (None when it has no id2label)."""
    id2label = config.extra.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        return [str(id2label[str(i)]) for i in range(len(id2label))]
    except KeyError:
        raise CheckpointError(f"id2label {id2label}: the ids must be 0 .. {len(id2label) - 1}") from None


def pad_id_of(config: GPTConfig) -> int:
    """The classifier's pad token: `pad_token_id`, else (a folder that has none) the end-of-text token."""
    pad = config.extra.get("pad_token_id")
    name, pad = ("eos_token_id", config.eos_token_id) if pad is None else ("pad_token_id", pad)
    if not (isinstance(pad, int) and 0 <= pad < config.vocab_size):  # transformers' default 50256 in a small vocabulary
        raise CheckpointError(
            f"the classifier pads with {name}={pad!r}, which is not a token of its {config.vocab_size:,}; "
            'set "pad_token_id" in its config.json to the tokenizer\'s end-of-text id'
        )
    return pad


class GPTClassifier(GPT):
    """GPT-2 with a classification head (transformers' GPT2ForSequenceClassification); `config` comes
    from `classifier_config`. The body's LM head stays tied to the embedding and is never saved."""

    def __init__(self, config: GPTConfig):
        labels = labels_of(config)
        if labels is None:
            raise OptionError("GPTClassifier needs a config from classifier_config (labels and pad_token_id)")
        super().__init__(config)
        self.labels, self.pad_token_id = labels, pad_id_of(config)
        self.score = nn.Linear(config.n_embd, len(labels), bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=config.initializer_range)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, lm_loss: bool = False):
        """Logits (B, num_labels) of the last non-padding token of each row of `input_ids` (B, T).

        Without `attention_mask` every token is attended to, as in transformers; with one, padding is
        skipped wherever it is (left, right or both). `lm_loss=True` (right-padded training batches) also
        returns the language-model loss of the texts' own next tokens through the tied LM head, padding
        ignored: GPT-1's auxiliary objective for fine-tuning."""
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.bool()
            order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices  # real tokens first, in order
            input_ids = torch.where(keep.gather(1, order), input_ids.gather(1, order), self.pad_token_id)
            input_ids = input_ids[:, : max(1, int(keep.sum(1).max()))]
        hidden = self.hidden(input_ids)
        logits = self.score(
            hidden[torch.arange(len(input_ids), device=hidden.device), last_token(input_ids, self.pad_token_id)]
        )
        if not lm_loss:
            return logits
        targets = input_ids[:, 1:].masked_fill(input_ids[:, 1:] == self.pad_token_id, -100)
        return logits, linear_cross_entropy(hidden[:, :-1].flatten(0, 1), self.lm_head.weight, targets.flatten())


def set_dropout(model: GPT, p: float) -> None:
    """Residual, embedding and attention dropout `p` in the model and its config (which saving records)."""
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = p
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if hasattr(m, "attn_dropout"):
            m.attn_dropout = p


def last_token(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Index of the rightmost id of each row that is not `pad_token_id` (0 for a row of padding only)."""
    positions = torch.arange(input_ids.size(1), device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


def from_language_model(lm: GPT, labels: Sequence[str], pad_token_id: int) -> GPTClassifier:
    """A classifier whose body is `lm`'s (the weights are shared, not copied) and whose head is new."""
    model = GPTClassifier.empty(classifier_config(lm.config, labels, pad_token_id))
    model.transformer = lm.transformer
    model.lm_head = lm.lm_head
    model.score = nn.Linear(lm.config.n_embd, len(labels), bias=False, device=lm.lm_head.weight.device)
    nn.init.normal_(model.score.weight, mean=0.0, std=lm.config.initializer_range)
    return model


# --- folders ----------------------------------------------------------------------------------------------


def save_classifier(
    model: GPTClassifier, folder: str | os.PathLike, tokenizer=None, *, state_dict: dict | None = None
) -> Path:
    """A transformers GPT2ForSequenceClassification folder (plus gptforge's tokenizer files)."""
    folder = save_model(model, folder, tokenizer, state_dict=state_dict)
    stored = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("torch_dtype")  # the weights' dtype
    config = model.config.to_dict() | ({"torch_dtype": stored} if stored else {})
    config["architectures"] = [ARCHITECTURE]
    atomic_write(folder / "config.json", lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return folder


def is_classifier_folder(path: str | os.PathLike) -> bool:
    """Whether config.json names a sequence-classification architecture (as gptforge and transformers write)."""
    try:
        config = json.loads((folder_of(Path(path)) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    archs = config.get("architectures") if isinstance(config, dict) else None
    return isinstance(archs, list) and any(str(a).endswith("ForSequenceClassification") for a in archs)


def load_classifier(name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> GPTClassifier:
    """A classification folder written by gptforge or by transformers, in eval mode."""
    path = resolve_model_path(name_or_path)
    folder = folder_of(path)
    config = GPTConfig.load(folder)
    if (
        is_classifier_folder(folder) and labels_of(config) is None
    ):  # transformers saves no id2label for its 2 default labels
        n = config.extra.get("num_labels", 2)
        config.extra.update(
            id2label={str(i): f"LABEL_{i}" for i in range(n)}, label2id={f"LABEL_{i}": i for i in range(n)}
        )
    if not is_classifier_folder(folder) or labels_of(config) is None:
        raise CheckpointError(
            f"{folder}: a language-model folder, not a classifier (config.json names no {ARCHITECTURE} and no "
            "id2label); "
            f"train one with `gptforge classify train DATA --init {folder} --out CLASSIFIER`"
        )
    sd = read_state_dict(path)
    score = sd.pop("score.weight", None)
    if score is None or tuple(score.shape) != (len(labels_of(config)), config.n_embd):
        found = "no score.weight" if score is None else f"score.weight of shape {tuple(score.shape)}"
        raise CheckpointError(
            f"{folder}: {found}; a classifier of {len(labels_of(config))} labels and n_embd={config.n_embd} "
            f"needs score.weight of shape ({len(labels_of(config))}, {config.n_embd})"
        )
    if not config.tie_word_embeddings and "lm_head.weight" not in sd:  # transformers' classifiers keep no LM head
        wte = sd.get("transformer.wte.weight", sd.get("wte.weight"))
        if wte is not None:
            sd["lm_head.weight"] = wte.clone()
    sd = from_hf_state_dict(sd, config, source=str(path))
    sd["score.weight"] = score
    model = GPTClassifier.empty(config)
    model.load_state_dict(sd, assign=True)
    model.tie_weights()
    if torch.device(device).type == "cpu":  # a CPU computes in fp32: fp16 / bf16 weights (--save-dtype) are widened
        model.float()
    return model.to(device).eval()


def build_classifier(
    init: str, labels: Sequence[str], pad_token_id: int | None, vocab_size: int | None = None
) -> GPTClassifier:
    """The classifier to train from `init`: a classification folder (its labels must cover `labels`, and
    keep their ids), a language-model folder or hub id (its body, a new head), or a preset (fresh weights;
    `vocab_size` is the tokenizer's)."""
    if is_preset(init):
        config = preset(init, **({"vocab_size": vocab_size} if vocab_size else {}))
        return GPTClassifier(classifier_config(config, labels, pad_token_id))
    if is_classifier_folder(resolve_model_path(init)):
        model = load_classifier(init)
        unknown = sorted(set(labels) - set(model.labels))
        if unknown:
            raise DataError(
                f"--init {init}: the classifier knows {', '.join(model.labels)}, not {', '.join(unknown)}; "
                "start from its language model, or train a new head with a language-model --init"
            )
        return model.train()
    from .checkpoint import load_model
    from .inference.quantize import refuse_quantized

    model = load_model(init)
    refuse_quantized(model.config, f"--init {init}", "be trained")
    return from_language_model(model, labels, pad_token_id).train()


# --- texts to batches --------------------------------------------------------------------------------------


def cut(ids, max_length: int, truncate: str = "right"):
    """`ids` cut to `max_length`: `truncate="right"` keeps the start, "left" the end."""
    return ids[:max_length] if truncate == "right" else ids[-max_length:]


def encode_texts(
    tokenizer, texts: Sequence[str], max_length: int | None, truncate: str = "right", where: Sequence[str] | None = None
) -> list[np.ndarray]:
    """Token ids of each text, `cut` to `max_length` (None: whole). A text with no tokens is an error naming it."""
    if truncate not in TRUNCATE:
        raise OptionError(
            f"--truncate {truncate!r}: choose right (keep the start of a long text) or left (keep its end)"
        )
    out = []
    for i, ids in enumerate(tokenizer.encode_batch(list(texts))):
        if not ids:
            at = where[i] if where is not None else f"text {i + 1}"
            raise DataError(f"{at}: the text is empty after tokenization; give it some text or drop the row")
        out.append(np.asarray(ids if max_length is None else cut(ids, max_length, truncate), dtype=np.int64))
    return out


def pad_batch(seqs: Sequence[np.ndarray], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), right-padded to the longest row."""
    T = max(len(s) for s in seqs)
    ids = np.full((len(seqs), T), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(seqs), T), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def predict_proba(
    model: GPTClassifier,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    truncate: str = "right",
    where: Sequence[str] | None = None,
) -> torch.Tensor:
    """Class probabilities (N, num_labels) of `texts`, cut to `max_length` tokens (default: the context) by the
    `truncate` policy."""
    if batch_size < 1:
        raise OptionError(f"--batch-size {batch_size}: must be at least 1")
    n_ctx = model.config.n_positions
    if max_length is not None and not (isinstance(max_length, int) and 0 < max_length <= n_ctx):
        raise OptionError(
            f"--max-length {max_length!r}: must be a number of tokens from 1 to the model's context, {n_ctx}"
        )
    seqs = encode_texts(tokenizer, texts, max_length or n_ctx, truncate, where)
    return probabilities(model, seqs, batch_size)


@torch.inference_mode()
def probabilities(model: GPTClassifier, seqs: Sequence[np.ndarray], batch_size: int = 32) -> torch.Tensor:
    """Class probabilities of token sequences. Sequences of similar length are batched together (sorted by
    length), so little time goes into padding; the rows come back in the order given."""
    from .inference.packed import cpu_inference_weights

    order = np.argsort([len(s) for s in seqs], kind="stable")
    device = next(model.parameters()).device
    probs = torch.empty(len(seqs), len(model.labels))
    was_training = model.training
    model.eval()
    with cpu_inference_weights(model, keep=not was_training):  # a model in training keeps no packed copies
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids, _ = pad_batch([seqs[i] for i in rows], model.pad_token_id)  # right-padded: no mask needed
            probs[torch.from_numpy(rows)] = F.softmax(model(ids.to(device)).float(), dim=-1).cpu()
    model.train(was_training)
    return probs


def predict(model: GPTClassifier, tokenizer, texts: Sequence[str], **options) -> list[dict]:
    """For each text, `{"label": best label, "score": its probability, "probs": {label: probability}}`.
    Options as in `predict_proba`."""
    probs = predict_proba(model, tokenizer, texts, **options)
    out = []
    for row in probs.tolist():
        best = int(np.argmax(row))
        out.append({"label": model.labels[best], "score": row[best], "probs": dict(zip(model.labels, row))})
    return out


# --- metrics -------------------------------------------------------------------------------------------------


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1 (the unweighted mean over classes), per-class precision/recall/F1/support, and the
    confusion matrix (rows: true label, columns: predicted label). A class never predicted has precision 0."""
    k = len(labels)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    tp = np.diag(confusion).astype(float)
    predicted, actual = confusion.sum(0), confusion.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(k), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=precision + recall > 0)
    present = actual > 0  # classes absent from the data do not drag the macro average down
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(actual[i]),
        }
        for i, name in enumerate(labels)
    }
    return {
        "accuracy": float(tp.sum() / max(1, confusion.sum())),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "examples": int(confusion.sum()),
        "per_class": per_class,
        "labels": list(labels),
        "confusion": confusion.tolist(),
    }


def evaluate_classifier(
    model: GPTClassifier,
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    where: Sequence[str] | None = None,
    **options,
) -> dict:
    """`classification_metrics` of the model's predictions on labelled texts, plus the mean loss."""
    if len(labels) != len(texts):
        raise DataError(f"{len(texts)} texts but {len(labels)} labels; give one label per text")
    label2id = {name: i for i, name in enumerate(model.labels)}
    for i, label in enumerate(labels):
        if label not in label2id:
            at = where[i] if where is not None else f"example {i + 1}"
            raise DataError(
                f"{at}: label {label!r} was never seen in training; the model knows {', '.join(model.labels)}"
            )
    probs = predict_proba(model, tokenizer, texts, where=where, **options)
    return metrics_of(probs, [label2id[label] for label in labels], model.labels)


def metrics_of(probs: torch.Tensor, y_true: Sequence[int], labels: Sequence[str]) -> dict:
    """`classification_metrics` of predicted probabilities, plus the mean cross-entropy (`loss`)."""
    y = torch.as_tensor(y_true, dtype=torch.long)
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), y).item()
    return {"loss": loss, **classification_metrics(y.tolist(), probs.argmax(-1).tolist(), labels)}


def format_metrics(m: dict) -> str:
    """The metrics as a plain-text report: headline figures, a per-class table, the confusion matrix."""
    width = max(8, *(len(name) for name in m["labels"]))
    lines = [
        f"examples {m['examples']}, accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}"
        + (f", loss {m['loss']:.4f}" if "loss" in m else ""),
        "",
        f"{'label':<{width}}  precision  recall      f1  support",
    ]
    for name, c in m["per_class"].items():
        lines.append(f"{name:<{width}}  {c['precision']:9.4f}  {c['recall']:6.4f}  {c['f1']:6.4f}  {c['support']:7d}")
    lines += ["", "confusion matrix (rows: true label, columns: predicted, in the order above)"]
    lines += [f"{name:<{width}}  " + " ".join(f"{n:5d}" for n in row) for name, row in zip(m["labels"], m["confusion"])]
    return "\n".join(lines)


__all__ = [
    "ARCHITECTURE",
    "GPTClassifier",
    "TRUNCATE",
    "build_classifier",
    "classification_metrics",
    "classifier_config",
    "cut",
    "encode_texts",
    "evaluate_classifier",
    "format_metrics",
    "from_language_model",
    "is_classifier_folder",
    "labels_of",
    "last_token",
    "load_classifier",
    "metrics_of",
    "pad_batch",
    "predict",
    "predict_proba",
    "probabilities",
    "set_dropout",
    "save_classifier",
]
