"""Datasets: any text in, token shards out (streaming, parallel, bounded memory), and training batches.

Pipeline of `prepare`:

  main process: read files in blocks -> decode (exact byte offset of bad UTF-8) -> split into documents
                (blank-line blocks, lines, CSV rows or JSON Lines rows) -> jobs of ~1 MB of text
  worker processes: clean (NFC, control characters, regex removals) -> encode (Tokenizer.encode_array,
                tiktoken when exact) -> token arrays + per-document byte counts and hashes
  main process: drop exact duplicates, route each document to train or val (seeded, by document),
                append tokens to `uint16`/`uint32` shards in a temporary folder that becomes `out_dir` in one rename

Only a bounded window of jobs is in flight, so peak memory depends on the job size and the number of
workers, not on the corpus. Each split's stream starts with `<|endoftext|>` and every document (or
line-by-line sample) is followed by one, so every sample is wrapped in `<|endoftext|>` on both sides.
"""
from __future__ import annotations

import codecs
import csv
import glob as globlib
import hashlib
import json
import os
import queue
import re
import sys
import threading
import time
import unicodedata
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .tokenizer import EOS, Tokenizer, load_tokenizer

FORMAT = "gptforge-tokens-1"
TEXT_EXTENSIONS = (".txt", ".md", ".text", ".csv", ".tsv", ".jsonl", ".ndjson")
BLOCK_BYTES = 1 << 20  # bytes read at a time
JOB_CHARS = 1 << 20  # characters of text per worker job
MAX_PIECE_CHARS = 16 << 20  # a document longer than this is encoded in pieces (cut where the ids cannot change)
SHARD_TOKENS = 100_000_000
NUL = b"\x00"
_BLANK_LINES = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")
# Where GPT-2's pre-tokenizer always starts a new pre-token, whatever the text around: after a line break
# between two non-space characters, before a single space between two non-space characters, or between a
# letter and punctuation (Chinese text has neither spaces nor, sometimes, line breaks).
_SAFE_CUT = re.compile(r"(?<=\S)\r?\n(?=\S)|(?<=\S)(?= \S)|(?<=[^\W\d_])(?=[^\w\s])")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff]")


class DataError(ValueError):
    """Input text or options that cannot be turned into a dataset."""


@dataclass
class ReadOptions:
    """How inputs are read and cleaned; every field is recorded in meta.json and part of its fingerprint."""

    line_by_line: bool = False  # each line / row is one sample; otherwise blank-line blocks are documents
    column: str | int | None = None  # CSV: column name, or 0-based index
    header: bool = True  # CSV: the first row names the columns
    field: str = "text"  # JSON Lines: field holding the text
    extensions: tuple[str, ...] = TEXT_EXTENSIONS  # file types taken from folders
    encoding_errors: str = "strict"  # "strict" reports bad UTF-8, "replace" continues with U+FFFD
    nfc: bool = False  # Unicode NFC normalisation
    drop_control: bool = False  # remove control characters (keeps tab and newlines)
    remove: tuple[str, ...] = ()  # regular expressions removed from every document (multiline mode)
    dedupe: bool = False  # drop exact duplicate documents (after cleaning)

    def __post_init__(self) -> None:
        if self.encoding_errors not in ("strict", "replace"):
            raise DataError(f"--encoding-errors {self.encoding_errors!r}: choose 'strict' or 'replace'")
        self.extensions = tuple(e if e.startswith(".") else "." + e for e in self.extensions)
        self.remove = tuple(self.remove)
        for pattern in self.remove:
            try:
                re.compile(pattern)
            except re.error as e:
                raise DataError(f"--remove {pattern!r} is not a valid regular expression ({e})") from None


# --- finding and fingerprinting inputs -------------------------------------------------------------------


def resolve_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike], extensions: Sequence[str] = TEXT_EXTENSIONS) -> list[Path]:
    """Files named by `inputs`: files as given, folders searched recursively by extension, glob patterns."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise DataError("no inputs given; name text files, folders or glob patterns")
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise FileNotFoundError(f"{path}: folder has no files ending in {', '.join(extensions)}; "
                                        "add --ext for other extensions")
            files += found
        elif path.is_file():
            files.append(path)
        elif any(c in str(item) for c in "*?["):
            found = sorted(Path(p) for p in globlib.glob(str(item), recursive=True) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"{item}: the pattern matches no files")
            files += found
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return files


def fingerprint_file(path: Path) -> dict:
    """Content hash (not timestamps), so a copied file reuses shards and an edited one rebuilds them."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(BLOCK_BYTES):
            h.update(block)
    return {"path": str(path), "bytes": path.stat().st_size, "blake2b": h.hexdigest()}


# --- reading: files -> documents -----------------------------------------------------------------------


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(suffix, "text")


def _decoded_blocks(path: Path, errors: str, split_long_lines: bool = False) -> Iterator[str]:
    """Text of `path` in blocks of whole lines; names the byte offset of invalid UTF-8 and rejects binary files.

    With `split_long_lines`, a line longer than MAX_PIECE_CHARS is passed on in parts, so memory stays
    bounded even for text without line breaks.
    """
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty; remove it from the inputs")
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    offset, carry = 0, ""
    with open(path, "rb") as f:
        while True:
            block = f.read(BLOCK_BYTES)
            if NUL in block:
                raise DataError(f"{path}: NUL byte at byte {offset + block.index(NUL)}; this looks like a binary "
                                "file, not text (remove it from the inputs)")
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
            try:
                text = carry + decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: invalid UTF-8 at byte {offset - pending + e.start}; "
                                "convert the file to UTF-8 or pass --encoding-errors replace") from None
            if offset == 0 and text.startswith("\ufeff"):
                text = text[1:]  # byte order mark
            offset += len(block)
            if not block:
                if text:
                    yield text
                break
            cut = text.rfind("\n") + 1
            if not cut and split_long_lines and len(text) > MAX_PIECE_CHARS:
                cut = len(text)
            carry = text[cut:]
            if cut:
                yield text[:cut]


def _text_pieces(path: Path, opts: ReadOptions) -> Iterator[tuple[list[str], list[bool]]]:
    """Batches of (texts, ends_document) of a plain text file, one batch per block read."""
    carry = ""
    for block in _decoded_blocks(path, opts.encoding_errors, split_long_lines=not opts.line_by_line):
        if opts.line_by_line:
            texts = [line.rstrip("\r") for line in block.split("\n") if line and not line.isspace()]
            yield texts, [True] * len(texts)
            continue
        parts = _BLANK_LINES.split(carry + block)
        carry = parts.pop()
        texts = [p.strip("\r\n") for p in parts if p and not p.isspace()]
        ends = [True] * len(texts)
        if len(carry) > MAX_PIECE_CHARS:  # one enormous document: pass it on in pieces the tokenizer cannot tell apart
            m = _SAFE_CUT.search(carry, len(carry) // 2)
            if m:
                texts.append(carry[: m.end()].lstrip("\r\n"))
                ends.append(False)
                carry = carry[m.end():]
        yield texts, ends
    carry = carry.strip("\r\n")
    if carry and not carry.isspace():
        yield [carry], [True]


def _batched(rows: Iterator[str]) -> Iterator[tuple[list[str], list[bool]]]:
    texts, size = [], 0
    for text in rows:
        texts.append(text)
        size += len(text)
        if size >= JOB_CHARS:
            yield texts, [True] * len(texts)
            texts, size = [], 0
    if texts:
        yield texts, [True] * len(texts)


def _csv_rows(path: Path, opts: ReadOptions, delimiter: str) -> Iterator[str]:
    csv.field_size_limit(sys.maxsize)
    lines = (line for block in _decoded_blocks(path, opts.encoding_errors) for line in block.splitlines(keepends=True))
    reader = csv.reader(lines, delimiter=delimiter)
    index = opts.column if isinstance(opts.column, int) else None
    if opts.header:
        header = next(reader, None) or []
        if isinstance(opts.column, str):
            if opts.column not in header:
                raise DataError(f"{path}: no column {opts.column!r}; the header has {header}; pass --column NAME or an index")
            index = header.index(opts.column)
        elif opts.column is None:
            if len(header) != 1:
                raise DataError(f"{path}: {len(header)} columns {header}; choose the text column with --column NAME")
            index = 0
    else:
        if isinstance(opts.column, str):
            raise DataError(f"{path}: --column {opts.column!r} is a name but --no-header says the file has no header; "
                            "pass a 0-based index instead")
        index = index or 0
    for row in reader:
        if not row:
            continue
        if index >= len(row):
            raise DataError(f"{path}: row {reader.line_num} has {len(row)} columns, no column {index}; check --column")
        if row[index].strip():
            yield row[index]


def _jsonl_rows(path: Path, opts: ReadOptions) -> Iterator[str]:
    n = 0
    for block in _decoded_blocks(path, opts.encoding_errors):
        for line in block.splitlines():
            n += 1
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); each line of a .jsonl file must be one JSON value") from None
            text = row if isinstance(row, str) else row.get(opts.field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{path}:{n}: no text field {opts.field!r} (found {keys}); choose it with --field NAME")
            if text.strip():
                yield text


def iter_pieces(files: Sequence[Path], opts: ReadOptions) -> Iterator[tuple[list[str], list[bool]]]:
    """Batches of (texts, ends_document) covering every document of every file in order, uncleaned.

    A text is a whole document unless its `ends_document` is False (a piece of an enormous document that
    the next text continues). Memory stays bounded by the block size.
    """
    for path in files:
        fmt = _format_of(path)
        if fmt == "text":
            batches = _text_pieces(path, opts)
        elif fmt in ("csv", "tsv"):
            batches = _batched(_csv_rows(path, opts, "," if fmt == "csv" else "\t"))
        else:
            batches = _batched(_jsonl_rows(path, opts))
        empty = True
        for texts, ends in batches:
            if texts:
                empty = False
                yield texts, ends
        if empty:
            raise DataError(f"{path}: no text in this file (only blank lines or empty rows); remove it from the inputs")


def clean(text: str, opts: ReadOptions, _compiled: dict = {}) -> str:
    """Apply the optional cleaning steps: NFC, control characters, regex removals."""
    if opts.nfc:
        text = unicodedata.normalize("NFC", text)
    if opts.drop_control:
        text = _CONTROL.sub("", text)
    for pattern in opts.remove:
        rx = _compiled.get(pattern) or _compiled.setdefault(pattern, re.compile(pattern, re.M))
        text = rx.sub("", text)
    return text


def iter_texts(inputs, **options) -> Iterator[str]:
    """Cleaned documents (whole) of `inputs`, as `prepare` sees them; used to train tokenizers on the same text."""
    opts = options.pop("options", None) or ReadOptions(**options)
    pending, seen = [], set()
    for texts, ends in iter_pieces(resolve_inputs(inputs, opts.extensions), opts):
        for text, end in zip(texts, ends):
            pending.append(clean(text, opts))
            if end:
                doc, pending = "".join(pending), []
                if opts.dedupe:
                    h = hashlib.blake2b(doc.encode("utf-8", "surrogatepass"), digest_size=8).digest()
                    if h in seen:
                        continue
                    seen.add(h)
                yield doc


# --- encoding jobs (run in worker processes) -------------------------------------------------------------


_worker: dict = {}


def _init_worker(tokenizer: Tokenizer, opts: ReadOptions, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no nested thread pools
    _worker.update(tokenizer=tokenizer, opts=opts, dtype=np.dtype(dtype))


def _encode_job(texts: list[str], ends: list[bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Clean and encode one job: (tokens with <|endoftext|> after each finished document, tokens per text
    including that separator, UTF-8 bytes per text, 64-bit hash per text or None)."""
    tok: Tokenizer = _worker["tokenizer"]
    opts: ReadOptions = _worker["opts"]
    if opts.nfc or opts.drop_control or opts.remove:
        texts = [clean(t, opts) for t in texts]
    finished = np.asarray(ends, dtype=bool)
    if any(EOS in t for t in texts):  # a literal <|endoftext|> in the text: encode texts one by one
        arrays = [np.append(tok.encode_array(t), [tok.eos_id] * e) for t, e in zip(texts, ends)]
        ids = np.concatenate(arrays)
        counts = np.array([len(a) for a in arrays], dtype=np.int64)
    else:  # one call for the whole job; the separators tell the texts apart again
        ids = tok.encode_array(EOS.join(texts) + EOS)
        cuts = np.flatnonzero(ids == tok.eos_id)
        counts = np.diff(cuts, prepend=-1)
        ids = np.delete(ids, cuts[~finished])  # a piece that the next text continues gets no separator
        counts[~finished] -= 1
    nbytes = np.array([len(t.encode("utf-8", "surrogatepass")) for t in texts], dtype=np.int64)
    hashes = None
    if opts.dedupe:
        hashes = np.array([int.from_bytes(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
                           for t in texts], dtype=np.uint64)
    return ids.astype(_worker["dtype"]), counts, nbytes, hashes


def _run_jobs(jobs, tokenizer: Tokenizer, opts: ReadOptions, dtype: str, workers: int):
    """(job, result of `_encode_job`) in input order, with at most 2 jobs per worker in flight (bounded memory)."""
    if workers <= 1:
        _init_worker(tokenizer, opts, dtype)
        for job in jobs:
            yield job, _encode_job(job[0], job[1])
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # fork: workers start in milliseconds and a user's script needs no `if __name__ == "__main__"` guard
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_init_worker,
                             initargs=(tokenizer, opts, dtype)) as pool:
        window: deque = deque()
        try:
            for job in jobs:
                window.append((job, pool.submit(_encode_job, job[0], job[1])))
                if len(window) >= 2 * workers:
                    job, fut = window.popleft()
                    yield job, fut.result()
            while window:
                job, fut = window.popleft()
                yield job, fut.result()
        finally:
            for _, fut in window:
                fut.cancel()


# --- writing shards ------------------------------------------------------------------------------------


class _ShardWriter:
    """Appends one split's tokens to numbered shard files; the stream starts with <|endoftext|>."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, eos_id: int, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.eos = np.array([eos_id], dtype=dtype)
        self.tokens = self.bytes = self.documents = 0
        self.shards: list[dict] = []
        self._file = None
        self._in_shard = 0

    def write(self, ids: np.ndarray) -> None:
        if self.tokens == 0 and len(ids):
            ids = np.concatenate([self.eos, ids])
        while len(ids):
            if self._file is None or self._in_shard >= self.shard_tokens:
                self._open()
            take = ids[: self.shard_tokens - self._in_shard]
            self._file.write(take.tobytes())
            self._in_shard += len(take)
            self.shards[-1]["tokens"] += len(take)
            self.tokens += len(take)
            ids = ids[len(take):]

    def _open(self) -> None:
        if self._file:
            self._file.close()
        name = f"{self.split}_{len(self.shards):04d}.bin"
        self._file = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0})
        self._in_shard = 0

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None

    def summary(self) -> dict:
        return {"tokens": self.tokens, "bytes": self.bytes, "documents": self.documents, "shards": self.shards}


def _carve_tail(folder: Path, train: dict, val: dict, fraction: float, dtype: np.dtype, byte_lengths: np.ndarray) -> None:
    """Move the last `fraction` of the train tokens into val (for corpora with too few documents to split)."""
    k = int(train["tokens"] * fraction)
    if k < 2:
        return
    tail = load_split_from(folder, train, dtype)
    tail = np.asarray(tail[len(tail) - k:]).copy()
    name = "val_0000.bin"
    tail.tofile(folder / name)
    val.update(tokens=k, documents=1, shards=[{"file": name, "tokens": k}], bytes=int(byte_lengths[tail].sum()))
    train["bytes"] -= val["bytes"]
    remove = k
    for shard in reversed(train["shards"]):
        cut = min(remove, shard["tokens"])
        shard["tokens"] -= cut
        os.truncate(folder / shard["file"], shard["tokens"] * dtype.itemsize)
        remove -= cut
    for shard in [s for s in train["shards"] if s["tokens"] == 0]:
        (folder / shard["file"]).unlink()
    train["shards"] = [s for s in train["shards"] if s["tokens"]]
    train["tokens"] -= k


# --- prepare ------------------------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "uint32"


def prepare(
    inputs,
    tokenizer: Tokenizer | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    line_by_line: bool = False,
    val_fraction: float = 0.1,
    val_inputs=None,
    seed: int = 0,
    workers: int | None = None,
    shard_tokens: int = SHARD_TOKENS,
    force: bool = False,
    progress: bool = False,
    **read_options,
) -> dict:
    """Tokenize `inputs` into train/val token shards in `out_dir` and return its meta.json contents.

    `inputs`: files, folders (recursive, by `extensions`), glob patterns, .csv/.tsv (`column`, `header`) and
    .jsonl (`field`). Documents are blank-line blocks of text files, or rows; with `line_by_line` each line
    is a sample. Each document goes to val with probability `val_fraction` (seeded); `val_inputs` instead
    names the validation text. When the corpus has too few documents for that (one book without blank
    lines), the last `val_fraction` of the tokens becomes val (meta "val_split": "tail").
    Running it again with the same inputs, options and tokenizer reuses the shards (meta "reused": True).
    Other keywords are `ReadOptions` (cleaning, encoding errors, ...).
    """
    opts = ReadOptions(line_by_line=line_by_line, **read_options)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 1)")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    out_dir = Path(out_dir)
    files = resolve_inputs(inputs, opts.extensions)
    val_files = resolve_inputs(val_inputs, opts.extensions) if val_inputs else []
    dtype = token_dtype(tok.vocab_size)
    # what decides the tokens; `extensions` only chose the files, which are fingerprinted themselves
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(opts).items() if k != "extensions"}
    options.update(val_fraction=0.0 if val_files else val_fraction, seed=seed, shard_tokens=shard_tokens)
    inputs_fp = [fingerprint_file(p) for p in files]
    val_fp = [fingerprint_file(p) for p in val_files]
    key = json.dumps([FORMAT, tok.fingerprint, [f["blake2b"] for f in inputs_fp], [f["blake2b"] for f in val_fp], options], sort_keys=True)
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]

    if out_dir.exists() and any(out_dir.iterdir()):
        old = _read_meta(out_dir) if (out_dir / "meta.json").is_file() else None
        if old is None:
            raise DataError(f"{out_dir}: folder exists and is not a prepared dataset (no meta.json); "
                            "choose a new or empty --out folder so nothing of yours is overwritten")
        if old.get("fingerprint") == fingerprint and not force and _complete(out_dir, old):
            return {**old, "reused": True}

    from .checkpoint import atomic_dir

    started = time.time()
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    total = sum(f["bytes"] for f in inputs_fp + val_fp)
    if total < 4 * JOB_CHARS:
        workers = 1  # starting processes costs more than it saves
    rng = np.random.default_rng(seed)
    seen: set[int] = set()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", file=sys.stderr)
    with atomic_dir(out_dir) as tmp:
        writers = {s: _ShardWriter(tmp, s, np.dtype(dtype), tok.eos_id, shard_tokens) for s in ("train", "val")}
        try:
            def jobs():
                """(texts, ends, source split) of ~JOB_CHARS each; a job never mixes train and val inputs."""
                for split, group in (("train", files), ("val", val_files)):
                    texts, ends = [], []
                    for t, e in iter_pieces(group, opts):
                        texts += t
                        ends += e
                        if sum(map(len, texts)) >= JOB_CHARS:
                            yield texts, ends, split
                            texts, ends = [], []
                    if texts:
                        yield texts, ends, split

            carried = -1  # split (0 train, 1 val) of a document that continues into the next job, else -1
            for (_, ends, source), (ids, counts, nbytes, hashes) in _run_jobs(jobs(), tok, opts, dtype, workers):
                ends = np.asarray(ends, dtype=bool)
                k = len(ends)
                starts = np.concatenate([[carried < 0], ends[:-1]])  # texts that begin a document
                whole = starts & ends
                keep = ~(whole & (counts <= 1))  # documents with no text left after cleaning
                if hashes is not None:
                    for i in np.flatnonzero(whole & keep):
                        h = int(hashes[i])
                        keep[i] = h not in seen
                        seen.add(h)
                label = np.zeros(k, dtype=np.int64)
                if source == "val":
                    label[:] = 1
                elif not val_files and val_fraction > 0:
                    new = starts & keep
                    label[new] = rng.random(int(new.sum())) < val_fraction
                    # continuation texts take the label of the document they continue
                    first = np.maximum.accumulate(np.where(starts, np.arange(k), -1))
                    label = np.where(first >= 0, label[np.maximum(first, 0)], carried)
                carried = -1 if ends[-1] else int(label[-1])
                per_token = np.repeat(np.where(keep, label, -1), counts)
                for s, name in enumerate(("train", "val")):
                    w = writers[name]
                    w.write(ids[per_token == s])
                    mine = keep & (label == s)
                    w.bytes += int(nbytes[mine].sum())
                    w.documents += int((mine & ends).sum())
                if bar is not None:
                    bar.update(int(nbytes.sum()))
        finally:
            for w in writers.values():
                w.close()
            if bar is not None:
                bar.close()
        train, val = writers["train"].summary(), writers["val"].summary()
        if train["tokens"] == 0:
            raise DataError(f"no text left in {', '.join(map(str, files))} after cleaning; check --remove and the inputs")
        val_split = "file" if val_files else "documents"
        if not val_files and val_fraction > 0 and val["tokens"] == 0:
            _carve_tail(tmp, train, val, val_fraction, np.dtype(dtype), tok.token_byte_lengths())
            val_split = "tail"
        meta = {
            "format": FORMAT,
            "fingerprint": fingerprint,
            "dtype": dtype,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "tokenizer": {"fingerprint": tok.fingerprint, "kind": tok.kind, "source": tok.source},
            "inputs": inputs_fp,
            "val_inputs": val_fp,
            "options": options,
            "val_split": val_split,
            "workers": workers,
            "train": train,
            "val": val,
            "seconds": round(time.time() - started, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        tok.save(tmp / "tokenizer")  # the exact tokenizer the ids belong to
    return {**meta, "reused": False}


def _read_meta(data_dir: Path) -> dict:
    try:
        return json.loads((data_dir / "meta.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{data_dir / 'meta.json'}: damaged ({e}); run `gptforge prepare` again") from None


def _complete(data_dir: Path, meta: dict) -> bool:
    size = np.dtype(meta["dtype"]).itemsize
    return all((data_dir / s["file"]).is_file() and (data_dir / s["file"]).stat().st_size == s["tokens"] * size
               for split in ("train", "val") for s in meta[split]["shards"])


# --- reading shards back ------------------------------------------------------------------------------


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
            parts.append(self.arrays[i][start - self.starts[i]:end - self.starts[i]])
            start = end
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate(self.arrays)
        return out.astype(dtype) if dtype is not None else out


def load_split_from(data_dir: Path, split_meta: dict, dtype) -> np.ndarray | ShardedTokens:
    arrays = [np.memmap(data_dir / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],)) for s in split_meta["shards"] if s["tokens"]]
    if not arrays:
        return np.zeros(0, dtype=dtype)
    return arrays[0] if len(arrays) == 1 else ShardedTokens(arrays)


def load_meta(data_dir: str | os.PathLike) -> dict:
    data_dir = Path(data_dir)
    if not (data_dir / "meta.json").is_file():
        raise FileNotFoundError(f"{data_dir}: not a prepared dataset (no meta.json); create it with `gptforge prepare`")
    meta = _read_meta(data_dir)
    if not _complete(data_dir, meta):
        raise DataError(f"{data_dir}: shard files are missing or truncated; run `gptforge prepare` again")
    return meta


def load_split(data_dir: str | os.PathLike, split: str) -> np.ndarray | ShardedTokens:
    """All tokens of "train" or "val" as a read-only memmap (a ShardedTokens view when there are several shards)."""
    if split not in ("train", "val"):
        raise DataError(f"split {split!r}: choose 'train' or 'val'")
    meta = load_meta(data_dir)
    return load_split_from(Path(data_dir), meta[split], np.dtype(meta["dtype"]))


# --- batches ------------------------------------------------------------------------------------------


class Batches:
    """Training batches drawn from a token array; `batch(step)` is a pure function of (seed, step, rank, world_size).

    * mode="random": nanoGPT-style windows of block_size + 1 tokens at random offsets.
    * mode="sequential": epochs over windows starting every `stride` tokens (default block_size, i.e. no
      overlap; block_size // 2 makes text across a window edge be learned in full context as well). Each
      epoch visits every window once in a seeded shuffled order (`shuffle=False`: in order); a global batch
      of batch_size * world_size windows is cut into one slice per rank, so ranks never share windows.

    Nothing depends on earlier calls, so a resumed run asks for step N and gets exactly the batch it would
    have had, and each rank of a distributed run draws its own share without communication.
    """

    def __init__(self, tokens, block_size: int, batch_size: int, *, mode: str = "random", stride: int | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if mode not in ("random", "sequential"):
            raise DataError(f"mode={mode!r}: choose 'random' or 'sequential'")
        if block_size < 1 or batch_size < 1:
            raise DataError(f"block_size={block_size} and batch_size={batch_size} must be positive")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        n = len(tokens)
        if n < block_size + 1:
            hint = 1 << max(0, (n - 2).bit_length() - 1) if n > 2 else 0
            raise DataError(f"the text has {n} tokens, fewer than one block of block_size + 1 = {block_size + 1}; "
                            + (f"use a block size of at most {n - 1} (e.g. --block-size {hint}) or add text" if hint else "add more text"))
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.mode, self.seed, self.rank, self.world_size, self.shuffle = mode, seed, rank, world_size, shuffle
        self.stride = stride or block_size
        if self.stride < 1:
            raise DataError(f"stride={stride} must be positive")
        self.num_windows = (n - block_size - 1) // self.stride + 1
        self.steps_per_epoch = self.num_windows // (batch_size * world_size)
        if mode == "sequential" and self.steps_per_epoch == 0:
            raise DataError(f"the text has {self.num_windows} windows of {block_size} tokens, fewer than one batch of "
                            f"batch_size * world_size = {batch_size * world_size}; lower --batch-size or --block-size")
        self._perm: tuple[int, np.ndarray] | None = None

    def starts(self, step: int) -> np.ndarray:
        """Window start offsets of this rank's batch at `step`."""
        if self.mode == "random":
            # One global batch per step, cut into rank slices: N ranks of batch B see exactly what one
            # process of batch N*B sees, so runs and checkpoints move between world sizes unchanged.
            rng = np.random.default_rng([self.seed, step])
            starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size * self.world_size)
            return starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_windows) if self.shuffle
                     else np.arange(self.num_windows))
            self._perm = (epoch, order)
        first = (i * self.world_size + self.rank) * self.batch_size
        return self._perm[1][first:first + self.batch_size] * self.stride

    def batch(self, step: int):
        """(x, y) int64 tensors of shape (batch_size, block_size); y is x shifted by one token."""
        import torch

        rows = np.stack([np.asarray(self.tokens[s:s + self.block_size + 1]) for s in self.starts(step)]).astype(np.int64)
        data = torch.from_numpy(rows)
        return data[:, :-1], data[:, 1:]

    def epoch(self, step: int) -> float:
        """Fraction of passes over the data done before `step` (sequential mode counts whole windows)."""
        return step / self.steps_per_epoch if self.steps_per_epoch else 0.0


class Prefetcher:
    """Yields batches for steps start, start+1, ... from a background thread, already on `device`.

    On CUDA the batch is pinned and copied with non_blocking=True, so the copy overlaps the previous step.
    `depth` bounds how many batches wait in memory. Errors in the thread are raised in the consumer.
    """

    _DONE = object()

    def __init__(self, batches: Batches, start_step: int, device, depth: int = 4, stop_step: int | None = None):
        import torch

        self.batches, self.step, self.stop_step = batches, start_step, stop_step
        self.device = torch.device(device)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gptforge-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        step = self.step
        try:
            while not self._stop.is_set() and (self.stop_step is None or step < self.stop_step):
                x, y = self.batches.batch(step)
                if self.device.type == "cuda":
                    x, y = x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
                elif self.device.type != "cpu":
                    x, y = x.to(self.device), y.to(self.device)
                self._put((x, y))
                step += 1
            self._put(self._DONE)
        except BaseException as e:  # handed to the consumer
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        self.step += 1
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- the entry older GPT-2 tools use -------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path(os.environ.get("GPTFORGE_CACHE") or Path.home() / ".cache" / "gptforge") / "datasets"


class TokenDataset:
    """A text file (or folder, glob, CSV, JSONL) tokenized once and cut into blocks, like older GPT-2 tools.

    Built on `prepare`: the shards live in `cache_dir` (default ~/.cache/gptforge/datasets/<fingerprint>, or
    $GPTFORGE_CACHE) and are reused while the text and tokenizer are unchanged. `dataset[i]` is the i-th
    non-overlapping block of `block_size` tokens of the training split; `batches()` gives `Batches`.
    """

    def __init__(self, file_path=None, vocab_file=None, merges_file=None, tokenizer_file=None, block_size: int = 1024,
                 line_by_line: bool = False, *, tokenizer: Tokenizer | None = None, val_fraction: float = 0.0,
                 cache_dir: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None, **prepare_options):
        if tokenizer is None:
            if tokenizer_file is not None:
                tokenizer = load_tokenizer(tokenizer_file)
            elif vocab_file is not None:
                tokenizer = load_tokenizer(vocab_file, merges_file=merges_file)
            elif data_dir is not None:
                tokenizer = load_tokenizer(Path(data_dir) / "tokenizer")
            else:
                raise DataError("TokenDataset needs a tokenizer: tokenizer_file=, vocab_file= + merges_file=, or tokenizer=")
        self.tokenizer, self.block_size = tokenizer, block_size
        if file_path is not None:
            if data_dir is None:
                files = resolve_inputs(file_path)
                key = json.dumps([tokenizer.fingerprint, [str(p.resolve()) for p in files], line_by_line, val_fraction,
                                  sorted(prepare_options.items())], default=str)
                data_dir = Path(cache_dir or default_cache_dir()) / hashlib.sha256(key.encode()).hexdigest()[:16]
            self.meta = prepare(file_path, tokenizer, data_dir, line_by_line=line_by_line, val_fraction=val_fraction,
                                **prepare_options)
        elif data_dir is None:
            raise DataError("TokenDataset needs file_path= (text to tokenize) or data_dir= (a prepared folder)")
        else:
            self.meta = load_meta(data_dir)
        if self.meta["tokenizer"]["fingerprint"] != tokenizer.fingerprint:
            raise DataError(f"{data_dir}: prepared with a different tokenizer ({self.meta['tokenizer']['source']}); prepare it again")
        self.data_dir = Path(data_dir)
        self.tokens = self.train = load_split(self.data_dir, "train")
        self.val = load_split(self.data_dir, "val")
        if len(self.tokens) < block_size + 1:
            Batches(self.tokens, block_size, 1)  # raises the "shorter than one block" error with a suggestion

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.block_size

    def __getitem__(self, i: int):
        import torch

        if not 0 <= i < len(self):
            raise IndexError(i)
        return torch.from_numpy(np.asarray(self.tokens[i * self.block_size:(i + 1) * self.block_size]).astype(np.int64))

    def batches(self, batch_size: int, split: str = "train", **kwargs) -> Batches:
        return Batches(self.train if split == "train" else self.val, self.block_size, batch_size, **kwargs)

    def __repr__(self) -> str:
        return f"TokenDataset({self.data_dir}, tokens={len(self.tokens)}, block_size={self.block_size})"


__all__ = ["Batches", "DataError", "Prefetcher", "ReadOptions", "ShardedTokens", "TokenDataset", "iter_texts",
           "load_meta", "load_split", "prepare", "resolve_inputs"]
