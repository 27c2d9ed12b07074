"""Reading a prepared dataset back: its meta.json, and each split's shards as one token array."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import DataError, NotFoundError


class ShardedTokens:
    """Several shard memmaps seen as one 1-D token array (slicing may cross shard edges)."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])
        self.dtype = arrays[0].dtype

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            key = int(key) + (len(self) if key < 0 else 0)
            i = int(np.searchsorted(self.starts, key, side="right")) - 1
            return self.arrays[i][key - self.starts[i]]
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise IndexError("ShardedTokens supports contiguous slices only")
        parts = []
        while start < stop:
            i = int(np.searchsorted(self.starts, start, side="right")) - 1
            end = min(stop, int(self.starts[i + 1]))
            parts.append(self.arrays[i][start - self.starts[i] : end - self.starts[i]])
            start = end
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate(self.arrays)
        return out.astype(dtype) if dtype is not None else out


def load_split_from(data_dir: Path, split_meta: dict, dtype) -> np.ndarray | ShardedTokens:
    """A split's shards as one array. A shard entry may skip `offset` tokens at the start of its file (a
    dataset of parts leaves out the <|endoftext|> that starts each later part's stream, and a split may be a
    slice of another's file)."""
    dtype = np.dtype(dtype)
    arrays = [
        np.memmap(
            data_dir / s["file"],
            dtype=dtype,
            mode="r",
            offset=s.get("offset", 0) * dtype.itemsize,
            shape=(s["tokens"],),
        )
        for s in split_meta["shards"]
        if s["tokens"]
    ]
    if not arrays:
        return np.zeros(0, dtype=dtype)
    return arrays[0] if len(arrays) == 1 else ShardedTokens(arrays)


def read_meta(data_dir: Path) -> dict:
    try:
        return json.loads((data_dir / "meta.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{data_dir / 'meta.json'}: damaged ({e}); run `gptforge prepare` again") from None


def shards_complete(data_dir: Path, meta: dict) -> bool:
    """Whether every shard file that `meta` names is there and holds the tokens it says."""
    size = np.dtype(meta["dtype"]).itemsize
    return all(
        (data_dir / s["file"]).is_file()
        and (data_dir / s["file"]).stat().st_size >= (s.get("offset", 0) + s["tokens"]) * size
        and ("offset" in s or (data_dir / s["file"]).stat().st_size == s["tokens"] * size)
        for split in ("train", "val")
        for s in meta[split]["shards"]
    )


def load_meta(data_dir: str | os.PathLike) -> dict:
    data_dir = Path(data_dir)
    parts = sorted(data_dir.glob("part-*-of-*")) if data_dir.is_dir() else []
    if parts and not (data_dir / "meta.json").is_file():
        count = int(parts[0].name.rsplit("-", 1)[1])
        done = sum((p / "meta.json").is_file() for p in parts)
        raise DataError(
            f"{data_dir}: {done} of {count} parts are prepared; run `gptforge prepare ... --part I/{count}` for "
            "the others (the folder is one dataset once every part is written)"
        )
    if not (data_dir / "meta.json").is_file():
        raise NotFoundError(f"{data_dir}: not a prepared dataset (no meta.json); create it with `gptforge prepare`")
    meta = read_meta(data_dir)
    if not shards_complete(data_dir, meta):
        raise DataError(f"{data_dir}: shard files are missing or truncated; run `gptforge prepare` again")
    return meta


def load_split(data_dir: str | os.PathLike, split: str) -> np.ndarray | ShardedTokens:
    """All tokens of "train" or "val" as a read-only memmap (a ShardedTokens view when there are several shards)."""
    if split not in ("train", "val"):
        raise DataError(f"split {split!r}: choose 'train' or 'val'")
    meta = load_meta(data_dir)
    return load_split_from(Path(data_dir), meta[split], np.dtype(meta["dtype"]))


__all__ = ["ShardedTokens", "load_meta", "load_split", "load_split_from", "read_meta", "shards_complete"]
