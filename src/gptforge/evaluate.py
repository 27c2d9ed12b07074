"""Perplexity with a sliding window, mean loss and bits per byte.

The text is a stream of N tokens, which makes N-1 predictions. Windows of at most `block_size` tokens
start every `stride` tokens; each window scores only the predictions no earlier window scored, so every
prediction is counted exactly once and, after the first window, sees at least `block_size - stride`
tokens of context. `stride == block_size` (the default) gives non-overlapping windows: the cheapest
estimate and the one training reports for its validation set; a smaller stride gives each prediction
more context (lower, more honest perplexity) for proportionally more compute.

Bits per byte (total nats / ln 2 / UTF-8 bytes) does not depend on the tokenizer, so it compares models
with different vocabularies, which perplexity per token cannot.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .model import GPT


@dataclass
class EvalResult:
    """Mean loss in nats per token, its exponential, bits per byte (None when bytes are unknown), tokens scored."""

    loss: float
    perplexity: float
    bits_per_byte: float | None
    tokens: int

    def __str__(self) -> str:
        bpb = f"{self.bits_per_byte:.4f}" if self.bits_per_byte is not None else "n/a"
        return f"loss {self.loss:.4f}  perplexity {self.perplexity:.3f}  bits/byte {bpb}  tokens {self.tokens:,}"


def _result(nats: float, count: int, bytes_count: int | None) -> EvalResult:
    loss = nats / count
    bpb = nats / math.log(2) / bytes_count if bytes_count else None
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), bits_per_byte=bpb, tokens=count)


def sliding_windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, scored) per window: inputs tokens[start:end], targets tokens[start+1:end+1], the last
    `scored` targets counted. Every target 1..n_tokens-1 is scored exactly once."""
    windows, done, start = [], 0, 0  # `done`: targets up to this index are scored
    while done < n_tokens - 1:
        end = min(start + block_size, n_tokens - 1)
        windows.append((start, end, end - done))
        done, start = end, start + stride
    return windows


def _as_tensor(tokens, start: int, end: int) -> torch.Tensor:
    if isinstance(tokens, torch.Tensor):
        return tokens[start:end].long()
    return torch.from_numpy(np.asarray(tokens[start:end], dtype=np.int64))


def _score(model: GPT, tokens, block_size: int | None, stride: int | None, batch_size: int,
           max_tokens: int | None, device, autocast_dtype) -> tuple[float, int]:
    """Total nats and number of predictions scored over one token stream."""
    n_ctx = model.config.n_positions
    block_size = n_ctx if block_size is None else block_size
    stride = block_size if stride is None else stride
    if not 0 < block_size <= n_ctx:
        raise ValueError(f"block_size={block_size} must be between 1 and the model's context n_positions={n_ctx}")
    if not 0 < stride <= block_size:
        raise ValueError(f"stride={stride} must be between 1 and block_size={block_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if isinstance(tokens, (list, tuple)):
        tokens = np.asarray(tokens, dtype=np.int64)
    if getattr(tokens, "ndim", 1) != 1:
        raise ValueError(f"tokens must be a 1-D array of token ids, got shape {tuple(tokens.shape)}")
    n = min(len(tokens), max_tokens) if max_tokens else len(tokens)
    if n < 2:
        raise ValueError(f"need at least 2 tokens to score a prediction, got {n}")
    device = torch.device(device) if device is not None else model.transformer.wte.weight.device
    windows = sliding_windows(n, block_size, stride)
    total = torch.zeros((), dtype=torch.float64, device=device)
    i = 0
    while i < len(windows):
        # Stack consecutive windows of the same length; only the last, shorter one stands alone.
        length = windows[i][1] - windows[i][0]
        group = [windows[i]]
        while len(group) < batch_size and i + len(group) < len(windows):
            w = windows[i + len(group)]
            if w[1] - w[0] != length:
                break
            group.append(w)
        i += len(group)
        keep = max(w[2] for w in group)
        x = torch.stack([_as_tensor(tokens, s, e) for s, e, _ in group])
        y = torch.stack([_as_tensor(tokens, s + 1, e + 1) for s, e, _ in group])[:, -keep:].clone()
        lo, hi = min(x.min(), y.min()).item(), max(x.max(), y.max()).item()  # on the host: no device sync
        if lo < 0 or hi >= model.config.vocab_size:
            raise ValueError(f"token ids {lo}..{hi} fall outside the model's vocab_size={model.config.vocab_size}; "
                             "were these tokens made with another tokenizer?")
        x = x.to(device, non_blocking=True)
        for row, (_, _, scored) in enumerate(group):
            y[row, : keep - scored] = -100  # already scored by an earlier window
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits, _ = model(x, logits_to_keep=keep)
        for row in range(len(group)):  # one row at a time: the float copy of (B, T, vocab) logits can be GBs
            total += F.cross_entropy(logits[row].float(), y[row], ignore_index=-100, reduction="sum")
    return total.item(), n - 1


@contextlib.contextmanager
def _eval_mode(model: GPT) -> Iterator[None]:
    """Eval mode (no dropout) for the duration; gives back the mode it found, even on error."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def evaluate_tokens(
    model: GPT,
    tokens,
    *,
    block_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    bytes_count: int | None = None,
    max_tokens: int | None = None,
    device=None,
    autocast_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Sliding-window loss over a 1-D token array (list, numpy array or memmap, tensor).

    `block_size` defaults to the model's context, `stride` to `block_size` (non-overlapping windows, what
    training reports). `bytes_count` (the UTF-8 size of the text the tokens encode) gives bits per byte.
    `max_tokens` scores only the first tokens of a long stream. The model's train/eval mode is restored.
    """
    with _eval_mode(model), torch.no_grad():
        nats, count = _score(model, tokens, block_size, stride, batch_size, max_tokens, device, autocast_dtype)
    return _result(nats, count, bytes_count)


def read_text_file(path: str | os.PathLike) -> str:
    """A UTF-8 text file's contents, or an error that names the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise ValueError(f"{path}: looks like a binary file (NUL bytes); give a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 (byte {e.start}); convert it, e.g. `iconv -f latin1 -t utf-8`") from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty; there is nothing to evaluate")
    return text


def _is_file_name(item) -> bool:
    if isinstance(item, os.PathLike):
        return True
    return isinstance(item, str) and len(item) < 4096 and "\n" not in item and os.path.isfile(item)


def evaluate_text(
    model: GPT,
    tokenizer,
    texts_or_files: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    block_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    device=None,
    autocast_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Loss, perplexity and bits per byte of texts, or of the UTF-8 files they name.

    Each text is scored on its own, as `<|endoftext|>` followed by its tokens, so its first token is
    predicted too and every byte is accounted for; totals are summed over the texts. Path objects, and
    strings that name an existing file, are read as files; other strings are the text itself.
    """
    items = [texts_or_files] if isinstance(texts_or_files, (str, os.PathLike)) else list(texts_or_files)
    if not items:
        raise ValueError("no texts or files to evaluate")
    nats, count, nbytes = 0.0, 0, 0
    with _eval_mode(model), torch.no_grad():
        for item in items:
            text = read_text_file(item) if _is_file_name(item) else item
            if not text:
                continue
            ids = [tokenizer.eos_id] + list(tokenizer.encode(text))
            left = max_tokens - count if max_tokens else None
            if left is not None and left < 2:
                break
            n, c = _score(model, ids, block_size, stride, batch_size, left, device, autocast_dtype)
            nats, count = nats + n, count + c
            # Bytes of the text actually scored (all of it unless max_tokens cut it short).
            nbytes += len(text.encode("utf-8")) if c == len(ids) - 1 else len(tokenizer.decode(ids[1:c + 1]).encode("utf-8"))
    if count == 0:
        raise ValueError("the texts are empty; there is nothing to evaluate")
    return _result(nats, count, nbytes)


def evaluate_prepared(model: GPT, folder: str | os.PathLike, split: str = "val", **options) -> EvalResult:
    """Loss of a split of a dataset prepared by `gptforge prepare` (a folder with meta.json and token shards).

    Bits per byte uses the split's bytes per token from meta.json, the same figure training reports.
    `options` are those of `evaluate_tokens`.
    """
    from .data import load_meta, load_split

    info = load_meta(folder).get(split) or {}
    if not info.get("tokens"):
        raise ValueError(f"{folder}: the prepared dataset has no {split!r} tokens; prepare it with a validation split")
    r = evaluate_tokens(model, load_split(folder, split), **options)
    if info.get("bytes"):
        r.bits_per_byte = r.loss / math.log(2) / (info["bytes"] / info["tokens"])
    return r


__all__ = ["EvalResult", "evaluate_prepared", "evaluate_text", "evaluate_tokens", "read_text_file", "sliding_windows"]
