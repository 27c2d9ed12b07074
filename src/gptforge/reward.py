"""Reward models: a GPT-2 body with a one-output head (transformers' GPT2ForSequenceClassification with
num_labels=1, as trl's RewardTrainer trains it) that scores a prompt and its answer. The folder is a classifier
folder (`classify.py`) whose one label is "reward"; it opens in transformers unchanged.

A text is scored as trl's RewardTrainer reads it in training: the prompt and the answer as one text, then the
end-of-text token; the score is the head's output at the last real token.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .classify import GPTClassifier, from_language_model, pad_batch

LABEL = "reward"


def is_reward_model(model) -> bool:
    """A classifier with one output: its "probabilities" are meaningless, its raw output is the score."""
    return isinstance(model, GPTClassifier) and len(model.labels) == 1


def build_reward_model(init: str, pad_token_id: int) -> GPTClassifier:
    """A reward model to train from a language-model folder or hub id (its body, a new one-output head)."""
    from .checkpoint import load_model
    from .inference.quantize import refuse_quantized

    lm = load_model(init)
    refuse_quantized(lm.config, f"--init {init}", "be trained")
    return from_language_model(lm, [LABEL], pad_token_id).train()


def encode_scored(tokenizer, texts: Sequence[str], max_length: int) -> list[np.ndarray]:
    """Each text's tokens and the end-of-text token, cut to `max_length` (keeping the start, as in training)."""
    return [
        np.asarray((ids + [tokenizer.eos_id])[:max_length], dtype=np.int64)
        for ids in tokenizer.encode_batch(list(texts))
    ]


@torch.inference_mode()
def scores(model: GPTClassifier, seqs: Sequence[np.ndarray], batch_size: int = 32) -> torch.Tensor:
    """The reward of each token sequence (similar lengths batched together; rows back in the order given)."""
    order = np.argsort([len(s) for s in seqs], kind="stable")
    device = next(model.parameters()).device
    out = torch.empty(len(seqs))
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, _ = pad_batch([seqs[i] for i in rows], model.pad_token_id)
        out[torch.from_numpy(rows)] = model(ids.to(device)).float()[:, 0].cpu()
    model.train(was_training)
    return out


def score(model: GPTClassifier, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 32):
    """The reward of each answer to its prompt, as a list of floats."""
    texts = [p + a for p, a in zip(prompts, answers)]
    return scores(model, encode_scored(tokenizer, texts, model.config.n_positions), batch_size).tolist()


__all__ = ["LABEL", "build_reward_model", "encode_scored", "is_reward_model", "score", "scores"]
