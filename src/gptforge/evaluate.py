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
import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data.textfile import read_text_file
from .errors import DataError, NotFoundError, OptionError
from .model import GPT
from .options import EvalOptions, refuse_unknown
from .progress import progress_bar


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


def bits_per_byte(loss: float, bytes_per_token: float | None) -> float | None:
    """Bits per UTF-8 byte from a mean loss in nats per token (None when the bytes are unknown)."""
    return loss / math.log(2) / bytes_per_token if bytes_per_token else None


def _result(nats: float, count: int, bytes_count: int | None) -> EvalResult:
    loss = nats / count
    return EvalResult(
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)),
        bits_per_byte=bits_per_byte(loss, bytes_count / count if bytes_count else None),
        tokens=count,
    )


def combine(results: Sequence[EvalResult]) -> EvalResult:
    """One result for several inputs: tokens and nats summed (bits per byte when every input has it)."""
    nats = sum(r.loss * r.tokens for r in results)
    count = sum(r.tokens for r in results)
    known = all(r.bits_per_byte for r in results)
    nbytes = sum(r.loss * r.tokens / math.log(2) / r.bits_per_byte for r in results) if known else None
    return _result(nats, count, nbytes)


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


def _score(
    model: GPT, tokens, opts: EvalOptions, max_tokens: int | None, device, autocast_dtype, progress: bool = False
) -> tuple[float, int]:
    """Total nats and number of predictions scored over one token stream."""
    n_ctx = model.config.n_positions
    block_size = n_ctx if opts.block_size is None else opts.block_size
    stride = block_size if opts.stride is None else opts.stride
    batch_size = opts.batch_size
    if not 0 < block_size <= n_ctx:
        raise OptionError(f"block_size={block_size} must be between 1 and the model's context n_positions={n_ctx}")
    if not 0 < stride <= block_size:
        raise OptionError(f"stride={stride} must be between 1 and block_size={block_size}")
    if isinstance(tokens, (list, tuple)):
        tokens = np.asarray(tokens, dtype=np.int64)
    if getattr(tokens, "ndim", 1) != 1:
        raise OptionError(f"tokens must be a 1-D array of token ids, got shape {tuple(tokens.shape)}")
    n = min(len(tokens), max_tokens) if max_tokens else len(tokens)
    if n < 2:
        raise DataError(f"need at least 2 tokens to score a prediction, got {n}")
    device = torch.device(device) if device is not None else model.transformer.wte.weight.device
    windows = sliding_windows(n, block_size, stride)
    total = torch.zeros((), dtype=torch.float64, device=device)
    bar = progress_bar(len(windows), desc="eval", unit="window", enabled=progress)
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
        bar.update(len(group))
        keep = max(w[2] for w in group)
        x = torch.stack([_as_tensor(tokens, s, e) for s, e, _ in group])
        y = torch.stack([_as_tensor(tokens, s + 1, e + 1) for s, e, _ in group])[:, -keep:].clone()
        lo, hi = min(x.min(), y.min()).item(), max(x.max(), y.max()).item()  # on the host: no device sync
        if lo < 0 or hi >= model.config.vocab_size:
            raise DataError(
                f"token ids {lo}..{hi} fall outside the model's vocab_size={model.config.vocab_size}; "
                "were these tokens made with another tokenizer?"
            )
        x = x.to(device, non_blocking=True)
        for row, (_, _, scored) in enumerate(group):
            y[row, : keep - scored] = -100  # already scored by an earlier window
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits, _ = model(x, logits_to_keep=keep)
        for row in range(len(group)):  # one row at a time: the float copy of (B, T, vocab) logits can be GBs
            total += F.cross_entropy(logits[row].float(), y[row], ignore_index=-100, reduction="sum")
    bar.close()
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


_EVAL_FIELDS = frozenset(f.name for f in dataclasses.fields(EvalOptions))


def _options(options: EvalOptions | None, overrides: dict) -> EvalOptions:
    refuse_unknown(EvalOptions, overrides, "evaluation")
    return dataclasses.replace(options or EvalOptions(), **overrides)


def evaluate_tokens(
    model: GPT,
    tokens,
    options: EvalOptions | None = None,
    *,
    bytes_count: int | None = None,
    device=None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    **eval_options,
) -> EvalResult:
    """Sliding-window loss over a 1-D token array (list, numpy array or memmap, tensor).

    Options are an `EvalOptions` and/or its fields as keywords: `block_size` defaults to the model's
    context, `stride` to `block_size` (non-overlapping windows, what training reports), `max_tokens`
    scores only the first tokens of a long stream. `bytes_count` (the UTF-8 size of the text the tokens
    encode) gives bits per byte. The model's train/eval mode is restored. `progress` shows a bar over the windows.
    """
    opts = _options(options, eval_options)
    with _eval_mode(model), torch.no_grad():
        nats, count = _score(model, tokens, opts, opts.max_tokens, device, autocast_dtype, progress)
    return _result(nats, count, bytes_count)


def _is_file_name(item) -> bool:
    """Whether `item` names a file to read; a folder, or a missing file's name (one word ending in a text
    file's extension, such as "valid.txt"), is an error rather than nine characters of text to score."""
    if isinstance(item, os.PathLike):
        return True
    if not (isinstance(item, str) and len(item) < 4096 and "\n" not in item):
        return False
    if os.sep in item and os.path.isdir(item):  # "corpus" alone may be a one-word text; "data/corpus" is a path
        raise DataError(
            f"{item}: a folder; give the text files in it (or, for data prepared by `gptforge prepare`, "
            "evaluate_prepared / `gptforge eval MODEL FOLDER`)"
        )
    if not os.path.isfile(item) and re.fullmatch(r"\S+\.(txt|md|text|jsonl|ndjson|json|csv|tsv)", item, re.I):
        raise NotFoundError(f"{item}: no such file (a text to score, not a file name, is passed as the text itself)")
    return os.path.isfile(item)


def evaluate_text(
    model: GPT,
    tokenizer,
    texts_or_files: str | os.PathLike | Sequence[str | os.PathLike],
    options: EvalOptions | None = None,
    *,
    device=None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    **eval_options,
) -> EvalResult:
    """Loss, perplexity and bits per byte of texts, or of the UTF-8 files they name.

    Each text is scored on its own, as `<|endoftext|>` followed by its tokens, so its first token is
    predicted too and every byte is accounted for; totals are summed over the texts. Path objects, and
    strings that name an existing file, are read as files; other strings are the text itself.
    """
    opts = _options(options, eval_options)
    max_tokens = opts.max_tokens
    items = [texts_or_files] if isinstance(texts_or_files, (str, os.PathLike)) else list(texts_or_files)
    if not items:
        raise OptionError("no texts or files to evaluate")
    nats, count, nbytes = 0.0, 0, 0
    with _eval_mode(model), torch.no_grad():
        for item in items:
            left = max_tokens - count if max_tokens else None  # tokens of the text still to score
            if left is not None and left < 1:
                break
            text = read_text_file(item) if _is_file_name(item) else item
            if not text:
                continue
            ids = None
            if (
                left is not None and len(text) > 64 * left
            ):  # encode only the start of a long text (64 chars a token is plenty)
                ids = [tokenizer.eos_id] + list(tokenizer.encode(text[: 64 * left]))
                text = text[: 64 * left] if len(ids) > left + 1 else text  # the last token may end mid-word
            if ids is None or len(ids) <= left + 1:
                ids = [tokenizer.eos_id] + list(tokenizer.encode(text))
            n, c = _score(
                model, ids, opts, None if left is None else left + 1, device, autocast_dtype, progress
            )  # + the <|endoftext|>
            nats, count = nats + n, count + c
            # Bytes of the text actually scored (all of it unless max_tokens cut it short).
            nbytes += (
                len(text.encode("utf-8"))
                if c == len(ids) - 1
                else len(tokenizer.decode(ids[1 : c + 1]).encode("utf-8"))
            )
    if count == 0:
        raise DataError("the texts are empty; there is nothing to evaluate")
    return _result(nats, count, nbytes)


def evaluate_prepared(model: GPT, folder: str | os.PathLike, split: str = "val", **options) -> EvalResult:
    """Loss of a split of a dataset prepared by `gptforge prepare` (a folder with meta.json and token shards).

    Bits per byte uses the split's bytes per token from meta.json, the same figure training reports.
    `options` are those of `evaluate_tokens`.
    """
    from .data.shards import load_meta, load_split

    if split not in ("train", "val"):
        raise OptionError(f"--split {split!r}: a prepared dataset has the splits 'train' and 'val'")
    info = load_meta(folder).get(split) or {}
    if not info.get("tokens"):
        raise DataError(f"{folder}: the prepared dataset has no {split!r} tokens; prepare it with a validation split")
    opts = _options(options.pop("options", None), {k: options.pop(k) for k in list(options) if k in _EVAL_FIELDS})
    if opts.max_tokens:  # the split starts with <|endoftext|>: N tokens scored are N + 1 of the stream, as for a text
        opts = dataclasses.replace(opts, max_tokens=opts.max_tokens + 1)
    r = evaluate_tokens(model, load_split(folder, split), opts, **options)
    r.bits_per_byte = bits_per_byte(r.loss, info["bytes"] / info["tokens"] if info.get("bytes") else None)
    return r


def evaluate_files(
    model: str | os.PathLike,
    files: Sequence[str | os.PathLike],
    options: EvalOptions | None = None,
    *,
    tokenizer=None,
    adapter=None,
    device: str = "auto",
    quantize: str | None = None,
    precision: str = "auto",
    split: str = "val",
    progress: bool = True,
) -> dict[str, EvalResult]:
    """`gptforge eval`: each of `files` (text files, or dataset folders written by `prepare`, scored on `split`)
    scored by the model, opened through the one door (its tokenizer only where text needs one), with a "total"
    over several. Missing files, and folders that are not prepared datasets, are refused before the model loads."""
    from .adapters import is_adapter
    from .checkpoint import load_model, load_model_and_tokenizer
    from .runtime import pick_precision, resolve_device

    for f in files:
        if not os.path.exists(f):
            raise NotFoundError(f"{f}: no such file or prepared dataset folder")
    prepared = [os.path.isfile(os.path.join(f, "meta.json")) for f in files]
    for f, is_prepared in zip(files, prepared):
        if os.path.isdir(f) and not is_prepared:
            raise NotFoundError(
                f"{f}: a folder without meta.json, not data prepared by `gptforge prepare`; give its "
                "text files, or a run's RUN/data"
            )
    if all(prepared) and not (adapter or is_adapter(model)):  # token shards need no tokenizer
        net, tok = load_model(model, device=resolve_device(device), quantize=quantize), None
    else:
        opened = dict(adapter=adapter, device=device, dtype=torch.float32, quantize=quantize)
        net, tok = load_model_and_tokenizer(model, tokenizer, **opened)
    dtype = pick_precision(precision, net.transformer.wte.weight.device)
    kw = dict(autocast_dtype=None if dtype == torch.float32 else dtype, progress=progress)
    results = {
        str(f): evaluate_prepared(net, f, split=split, options=options, **kw)
        if is_prepared
        else evaluate_text(net, tok, [Path(f)], options, **kw)  # a file, whatever its name
        for f, is_prepared in zip(files, prepared)
    }
    if len(results) > 1:
        results["total"] = combine(list(results.values()))
    return results


__all__ = [
    "evaluate_files",
    "EvalOptions",
    "EvalResult",
    "bits_per_byte",
    "combine",
    "evaluate_prepared",
    "evaluate_text",
    "evaluate_tokens",
    "read_text_file",
    "sliding_windows",
]
