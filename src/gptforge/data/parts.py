"""A dataset prepared in parts: `prepare --part I/N` on N machines (or a SLURM array, or torchrun's ranks), each
writing `part-I-of-N/` of one folder, which becomes one dataset when the last part is written.

The rules, which depend on the inputs alone (never on the machine):

- Units: the inputs in the order `resolve_inputs` gives them (sorted), training files first, then --val-file
  files, each plain text file larger than BLOCK_BYTES (256 MiB) cut into blocks that begin where a document
  begins (`cut_large`); unit k is the k-th. Each unit lands in exactly one part: part I holds the units whose
  middle byte lies in the I-th N-th of all the inputs' bytes, so parts are contiguous runs of about equal size.
- Train/val: each document goes to val with probability --val-fraction, drawn from a generator seeded by
  (--seed, its unit) in the order of the unit's documents: the same draw whichever part holds the unit.
  --val-file files are val, whole. The fall-backs for a corpus with too few documents apply to the whole: when no
  document drew val, the last --val-fraction of the training tokens is val ("tail"), as in one `prepare`.
  Exact duplicates (--dedupe) are dropped within a part; a document repeated in two parts is kept in both.
- Order: the dataset's tokens are part 1's, then part 2's, ...: each split's stream equals one `prepare` of all
  the inputs (each part's stream starts with <|endoftext|>; the whole's reads that token once).
- Resuming: a finished part (its meta.json and complete shards, for the same inputs and options) is skipped when
  the command runs again; a part killed half-way left only a temporary folder, which is removed, and is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..fsio import atomic_dir, write_text
from .reading import format_of
from .tokens import read_meta, shards_complete

BLOCK_BYTES = 256 << 20  # a plain text file larger than this is several units, cut where a document ends


@dataclass(frozen=True)
class FileBlock:
    """Bytes [start, stop) of a text file, a unit of its own: it begins where a document (with --line-by-line,
    a line) begins, so it holds exactly the documents one reading of the whole file finds there. It reads as
    its file does (reading.py opens it, seeks to `start` and stops at `stop`) and errors name the file."""

    path: Path
    start: int
    stop: int

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def suffix(self) -> str:
        return self.path.suffix

    def stat(self):
        return self.path.stat()

    def fingerprint(self) -> dict:
        h = hashlib.blake2b(digest_size=16)
        with open(self.path, "rb") as f:
            f.seek(self.start)
            left = self.stop - self.start
            while left > 0 and (chunk := f.read(min(1 << 20, left))):
                h.update(chunk)
                left -= len(chunk)
        size = self.path.stat().st_size
        return {"path": str(self.path), "bytes": self.stop - self.start, "blake2b": h.hexdigest(),
                "start": self.start, "file_bytes": size}  # fmt: skip


def _cut_after(f, pos: int, separator: re.Pattern) -> int | None:
    """The end of the first separator at or after byte `pos` (the whole run of blank lines), or None."""
    f.seek(pos)
    buf = b""
    while True:
        chunk = f.read(1 << 20)
        buf += chunk
        m = separator.search(buf)
        if m and (m.end() < len(buf) or not chunk):
            return pos + m.end()
        if not chunk:
            return None


def cut_large(files: list, line_by_line: bool) -> list:
    """Each plain text file larger than BLOCK_BYTES as blocks of about that size (FileBlock), cut at the
    first document boundary (a run of blank lines; with `line_by_line`, a line end) at or after each multiple
    of BLOCK_BYTES; other inputs as they are. One `prepare` and every part cut the same way."""
    separator = re.compile(rb"\n" if line_by_line else rb"\n(?:[ \t\r\f\v]*\n)+")
    units = []
    for path in files:
        size = path.stat().st_size if isinstance(path, Path) else 0
        if size <= BLOCK_BYTES or format_of(path) != "text":
            units.append(path)
            continue
        cuts = [0]
        with open(path, "rb") as f:
            while (target := (cuts[-1] // BLOCK_BYTES + 1) * BLOCK_BYTES) < size:  # the next multiple past the cut
                cut = _cut_after(f, target, separator)
                if cut is None or cut >= size:
                    break
                cuts.append(cut)
        units += [FileBlock(path, a, b) for a, b in zip(cuts, cuts[1:] + [size])]
    return units


def part_folder(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


def _size(path) -> int:
    if isinstance(path, FileBlock):
        return path.stop - path.start
    return path.stat().st_size if isinstance(path, Path) else 1  # a Hugging Face dataset: one unit of its own


def split_inputs(files: list, val_files: list, index: int, count: int, key: list) -> tuple[list, list, dict]:
    """The training and validation inputs of part `index` (1-based) of `count`, and the part's record: which
    units it holds and the identity of the whole (the names and sizes of every input, with `key`, the format,
    tokenizer and options), which every part must share."""
    units = files + val_files
    sizes = [_size(p) for p in units]
    total = max(sum(sizes), 1)
    middle = np.cumsum(sizes) - np.asarray(sizes) / 2
    owner = np.minimum((middle * count // total).astype(int), count - 1) if units else np.zeros(0, int)
    mine = [k for k in range(len(units)) if owner[k] == index - 1]
    first, end = (mine[0], mine[-1] + 1) if mine else (0, 0)
    names = [(str(p), getattr(p, "start", 0), s) for p, s in zip(units, sizes)]
    whole = json.dumps([key, names, len(files), count], sort_keys=True)
    info = {
        "index": index,
        "of": count,
        "units": [first, end],
        "whole": hashlib.sha256(whole.encode()).hexdigest()[:16],
    }
    return [units[k] for k in mine if k < len(files)], [units[k] for k in mine if k >= len(files)], info


def _finished_parts(out_dir: Path, count: int) -> list[dict] | None:
    metas = []
    for i in range(1, count + 1):
        folder = out_dir / part_folder(i, count)
        if not (folder / "meta.json").is_file():
            return None
        meta = read_meta(folder)
        if not shards_complete(folder, meta):
            return None
        metas.append(meta)
    wholes = {m["part"]["whole"] for m in metas}
    if len(wholes) > 1:
        raise DataError(
            f"{out_dir}: its parts were prepared from different inputs or options; prepare every part with the "
            "same command (and the same --part N), or remove the stale part folders"
        )
    return metas


def _joined(metas: list[dict], split: str, count: int) -> dict:
    """One split of the whole: the parts' shards in order, each later part's first token (its stream's
    leading <|endoftext|>) skipped where an earlier part already started the stream."""
    shards, started = [], False
    totals = {"tokens": 0, "bytes": 0, "documents": 0}
    for meta in metas:
        part = meta[split]
        for key in ("bytes", "documents"):
            totals[key] += part[key]
        for n, shard in enumerate(part["shards"]):
            skip = 1 if (n == 0 and started) else 0
            if shard["tokens"] - skip > 0:
                file = f"{part_folder(meta['part']['index'], count)}/{shard['file']}"
                shards.append({"file": file, "tokens": shard["tokens"] - skip, "offset": skip})
                totals["tokens"] += shard["tokens"] - skip
        started = started or part["tokens"] > 0
    return {**totals, "shards": shards}


def _tail_as_val(train: dict, fraction: float, byte_lengths, out_dir: Path, dtype) -> dict:
    """The last `fraction` of the training tokens as val, as slices of the same shard files (one `prepare`
    moves them to a file of their own: the same tokens)."""
    from .tokens import load_split_from

    k = int(train["tokens"] * fraction)
    val = {"tokens": 0, "bytes": 0, "documents": 0, "shards": []}
    if k < 2:
        return val
    tail = np.asarray(load_split_from(out_dir, train, dtype)[train["tokens"] - k :])
    val.update(tokens=k, documents=1, bytes=int(byte_lengths[tail].sum()))
    remove = k
    for shard in reversed(train["shards"]):
        cut = min(remove, shard["tokens"])
        if cut:
            shard["tokens"] -= cut
            val["shards"].insert(0, {"file": shard["file"], "tokens": cut, "offset": shard["offset"] + shard["tokens"]})
        remove -= cut
    train["shards"] = [s for s in train["shards"] if s["tokens"]]
    train.update(tokens=train["tokens"] - k, bytes=train["bytes"] - val["bytes"])
    return val


def combine_parts(out_dir: Path, count: int) -> dict | None:
    """Make `out_dir` one dataset (its meta.json and tokenizer) when all `count` parts are written; None while
    some are not. Any part may do it, more than once: the result is the same."""
    metas = _finished_parts(out_dir, count)
    if metas is None:
        return None
    first = metas[0]
    train, val = _joined(metas, "train", count), _joined(metas, "val", count)
    fraction, val_split = first["options"]["val_fraction"], first["val_split"]
    if val_split == "documents" and train["tokens"] == 0:  # every document drew val: they train, and the tail is val
        train, val = val, {"tokens": 0, "bytes": 0, "documents": 0, "shards": []}
    if train["tokens"] == 0:
        raise DataError(f"{out_dir}: no text left in any part after cleaning; check --remove and the inputs")
    if val_split == "documents" and fraction > 0 and val["tokens"] == 0:
        from ..tokenizer import load_tokenizer

        lengths = load_tokenizer(out_dir / part_folder(1, count) / "tokenizer").token_byte_lengths()
        val, val_split = _tail_as_val(train, fraction, lengths, out_dir, np.dtype(first["dtype"])), "tail"
    fingerprint = hashlib.sha256("".join(m["fingerprint"] for m in metas).encode()).hexdigest()[:16]
    keep = ("format", "dtype", "vocab_size", "eos_id", "tokenizer", "options")
    meta = {k: first[k] for k in keep}
    meta.update(
        fingerprint=fingerprint,
        inputs=[f for m in metas for f in m["inputs"]],
        val_inputs=[f for m in metas for f in m["val_inputs"]],
        val_split=val_split,
        parts=[part_folder(m["part"]["index"], count) for m in metas],
        train=train,
        val=val,
    )
    if not (out_dir / "tokenizer").is_dir():
        with atomic_dir(out_dir / "tokenizer") as tmp:
            shutil.copytree(out_dir / part_folder(1, count) / "tokenizer", tmp, dirs_exist_ok=True)
    write_text(out_dir / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return meta


__all__ = ["combine_parts", "part_folder", "split_inputs"]
