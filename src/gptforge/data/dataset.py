"""Datasets as objects: `TokenDataset` (text tokenized once and cut into blocks, as older GPT-2 tools have
it) and `RunData` (what a training run reads from a prepared folder)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..tokenizer import Tokenizer, load_tokenizer
from .batches import Batches
from .reading import resolve_inputs
from .shards import load_meta, load_split, prepare

# --- the entry older GPT-2 tools use -------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path(os.environ.get("GPTFORGE_CACHE") or Path.home() / ".cache" / "gptforge") / "datasets"


class TokenDataset:
    """A text file (or folder, glob, CSV, JSONL) tokenized once and cut into blocks, like older GPT-2 tools.

    Built on `prepare`: the shards live in `cache_dir` (default ~/.cache/gptforge/datasets/<fingerprint>, or
    $GPTFORGE_CACHE) and are reused while the text and tokenizer are unchanged. `dataset[i]` is the i-th
    non-overlapping block of `block_size` tokens of the training split; `batches()` gives `Batches`.
    """

    def __init__(
        self,
        file_path=None,
        vocab_file=None,
        merges_file=None,
        tokenizer_file=None,
        block_size: int = 1024,
        line_by_line: bool = False,
        *,
        tokenizer: Tokenizer | None = None,
        val_fraction: float = 0.0,
        cache_dir: str | os.PathLike | None = None,
        data_dir: str | os.PathLike | None = None,
        **prepare_options,
    ):
        if not (isinstance(block_size, int) and not isinstance(block_size, bool) and block_size > 0):
            raise DataError(f"block_size={block_size!r}: must be a number of tokens, at least 1")
        if tokenizer is None:
            if tokenizer_file is not None:
                tokenizer = load_tokenizer(tokenizer_file)
            elif vocab_file is not None:
                tokenizer = load_tokenizer(vocab_file, merges_file=merges_file)
            elif data_dir is not None:
                tokenizer = load_tokenizer(Path(data_dir) / "tokenizer")
            else:
                raise DataError(
                    "TokenDataset needs a tokenizer: tokenizer_file=, vocab_file= + merges_file=, or tokenizer="
                )
        self.tokenizer, self.block_size = tokenizer, block_size
        if file_path is not None:
            if data_dir is None:
                files = resolve_inputs(file_path)
                key = json.dumps(
                    [
                        tokenizer.fingerprint,
                        [str(p.resolve()) for p in files],
                        line_by_line,
                        val_fraction,
                        sorted(prepare_options.items()),
                    ],
                    default=str,
                )
                data_dir = Path(cache_dir or default_cache_dir()) / hashlib.sha256(key.encode()).hexdigest()[:16]
            self.meta = prepare(
                file_path, tokenizer, data_dir, line_by_line=line_by_line, val_fraction=val_fraction, **prepare_options
            )
        elif data_dir is None:
            raise DataError("TokenDataset needs file_path= (text to tokenize) or data_dir= (a prepared folder)")
        else:
            self.meta = load_meta(data_dir)
        if self.meta["tokenizer"]["fingerprint"] != tokenizer.fingerprint:
            raise DataError(
                f"{data_dir}: prepared with a different tokenizer ({self.meta['tokenizer']['source']}); prepare it "
                "again"
            )
        self.data_dir = Path(data_dir)
        self.tokens = self.train = load_split(self.data_dir, "train")
        self.val = load_split(self.data_dir, "val")
        if len(self.tokens) < block_size + 1:
            Batches(self.tokens, block_size, 1)  # raises the "shorter than one block" error with a suggestion

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.block_size

    def __getitem__(self, i: int):
        import torch

        if not -len(self) <= i < len(self):
            raise IndexError(f"block {i} of a dataset of {len(self)} blocks")
        i %= len(self)  # ds[-1] is the last block, as for a list
        return torch.from_numpy(
            np.asarray(self.tokens[i * self.block_size : (i + 1) * self.block_size]).astype(np.int64)
        )

    def batches(self, batch_size: int, split: str = "train", **kwargs) -> Batches:
        return Batches(self.train if split == "train" else self.val, self.block_size, batch_size, **kwargs)

    def __repr__(self) -> str:
        return f"TokenDataset({self.data_dir}, tokens={len(self.tokens)}, block_size={self.block_size})"


@dataclass
class RunData:
    """Token arrays of a prepared dataset and what is needed to turn a loss into bits per byte."""

    train: object
    val: object | None
    bytes_per_token: float | None  # validation UTF-8 bytes per token
    fingerprint: str = ""
    tokenizer_fingerprint: str = ""
    vocab_size: int | None = None  # of the tokenizer the tokens were made with
    source: str = ""  # the folder, for messages


def load_run_data(data) -> RunData:
    """`data` is a prepared dataset folder (with meta.json) or a TokenDataset."""
    folder = Path(getattr(data, "data_dir", data))
    meta = load_meta(folder)
    val_meta = meta.get("val") or {}
    val = load_split(folder, "val") if val_meta.get("tokens") else None
    bpt = val_meta["bytes"] / val_meta["tokens"] if val_meta.get("tokens") else None
    fingerprint = json.dumps(meta.get("fingerprint") or meta.get("inputs") or "", sort_keys=True)
    return RunData(
        load_split(folder, "train"),
        val,
        bpt,
        fingerprint,
        (meta.get("tokenizer") or {}).get("fingerprint", ""),
        meta.get("vocab_size"),
        str(folder),
    )


__all__ = ["RunData", "TokenDataset", "default_cache_dir", "load_run_data"]
