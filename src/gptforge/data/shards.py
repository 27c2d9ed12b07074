"""`prepare`: documents in, token shards out (streaming, parallel, bounded memory), and reading them back.

  main process: read files in blocks -> decode -> split into documents -> jobs of ~1 MB of text
  worker processes: clean (NFC, control characters, regex removals) -> encode (Tokenizer.encode_array,
                tiktoken when exact) -> token arrays + per-document byte counts and hashes
  main process: drop exact duplicates, route each document to train or val (seeded, by document),
                append tokens to `uint16`/`uint32` shards in a temporary folder that becomes `out_dir` in one rename

Only a bounded window of jobs is in flight, so peak memory depends on the job size and the number of
workers, not on the corpus. Each split's stream starts with `<|endoftext|>` and every document (or
line-by-line sample) is followed by one, so every sample is wrapped in `<|endoftext|>` on both sides.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..fsio import atomic_dir, remove_stale
from ..options.data import SHARD_TOKENS, PrepareOptions
from ..progress import finish, progress_bar
from ..tokenizer import Tokenizer, load_tokenizer
from .encoding import run_jobs
from .reading import JOB_CHARS, ReadOptions, fingerprint_file, iter_pieces, resolve_inputs
from .tokens import ShardedTokens, load_meta, load_split, load_split_from, read_meta, shards_complete

FORMAT = "gptforge-tokens-1"


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
            ids = ids[len(take) :]

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


def _val_to_train(folder: Path, train: dict, val: dict) -> None:
    """Make every validation shard a training one: the seeded draw sent all of a few documents to val."""
    for i, shard in enumerate(val["shards"]):
        name = f"train_{i:04d}.bin"
        os.replace(folder / shard["file"], folder / name)
        train["shards"].append({"file": name, "tokens": shard["tokens"]})
    for key in ("tokens", "bytes", "documents"):
        train[key], val[key] = train[key] + val[key], 0
    val["shards"] = []


def _carve_tail(
    folder: Path, train: dict, val: dict, fraction: float, dtype: np.dtype, byte_lengths: np.ndarray
) -> None:
    """Move the last `fraction` of the train tokens into val (for corpora with too few documents to split)."""
    k = int(train["tokens"] * fraction)
    if k < 2:
        return
    tail = load_split_from(folder, train, dtype)
    tail = np.asarray(tail[len(tail) - k :]).copy()
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


def _jobs(files: list, val_files: list, opts: ReadOptions, first_unit: int = 0):
    """(texts, ends, source split, unit of each text) of ~JOB_CHARS each; a job never mixes train and val
    inputs. Input file k (training files first, then validation files) is unit `first_unit + k`."""
    unit = first_unit
    for split, group in (("train", files), ("val", val_files)):
        texts, ends, units = [], [], []
        for path in group:
            for t, e in iter_pieces([path], opts):
                texts += t
                ends += e
                units += [unit] * len(t)
                if sum(map(len, texts)) >= JOB_CHARS:
                    yield texts, ends, split, units
                    texts, ends, units = [], [], []
            unit += 1
        if texts:
            yield texts, ends, split, units


class _Draws:
    """The val draws of documents: each unit (input file) has a generator of its own, seeded by (seed, unit),
    so a document's split depends on its file and its place there, not on which part or machine prepares it."""

    def __init__(self, seed: int):
        self.seed, self.unit, self.rng = seed, None, None

    def __call__(self, unit: int, n: int) -> np.ndarray:
        if unit != self.unit:
            self.unit, self.rng = unit, np.random.default_rng([self.seed, unit])
        return self.rng.random(n)


def _route(results, writers: dict, val_fraction: float, draws: _Draws, bar) -> None:
    """Write each encoded document to its split: a val input's to val, otherwise val with probability
    `val_fraction` (`draws`); empty documents and (with dedupe) repeats are dropped. A document cut into
    several texts keeps one label across jobs."""
    seen: set[int] = set()
    carried = -1  # split (0 train, 1 val) of a document that continues into the next job, else -1
    for (_, ends, source, units), (ids, counts, nbytes, hashes) in results:
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
        elif val_fraction > 0:
            new, units = starts & keep, np.asarray(units)
            for unit in dict.fromkeys(units[new].tolist()):  # in order of appearance
                mine = np.flatnonzero(new & (units == unit))
                label[mine] = draws(unit, len(mine)) < val_fraction
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


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "uint32"


_DEFAULT = PrepareOptions()  # the defaults of `prepare`, written once in options/data.py


def prepare(
    inputs,
    tokenizer: Tokenizer | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    line_by_line: bool = _DEFAULT.line_by_line,
    val_fraction: float = _DEFAULT.val_fraction,
    val_inputs=None,
    seed: int = _DEFAULT.seed,
    workers: int | None = _DEFAULT.workers,
    shard_tokens: int = _DEFAULT.shard_tokens,
    force: bool = _DEFAULT.force,
    part: str | None = _DEFAULT.part,
    progress: bool = False,
    expect_same: bool = False,
    exclude=(),
    **read_options,
) -> dict:
    """Tokenize `inputs` into train/val token shards in `out_dir` and return its meta.json contents.

    `inputs`: files, folders (recursive, by `extensions`), glob patterns, .csv/.tsv (`column`, `header`) and
    .jsonl (`field`). Documents are blank-line blocks of text files, or rows; with `line_by_line` each line
    is a sample. Each document goes to val with probability `val_fraction` (drawn from a generator seeded by
    `seed` and its file's place among the inputs); `val_inputs` instead names the validation text. When the
    corpus has too few documents for that (one book without blank lines), the last `val_fraction` of the
    tokens becomes val (meta "val_split": "tail").
    The same inputs, options and tokenizer again reuse the shards (meta "reused": True); with `expect_same` (a
    resumed run) a dataset made otherwise is refused, saying what changed. Folders and patterns never yield files
    under `out_dir` or `exclude` (a run folder). `part` "I/N" writes part I of N into out_dir/part-I-of-N
    (data/parts.py); the folder becomes one dataset when the last part is written. Other keywords are
    `ReadOptions`.
    """
    where = PrepareOptions(part=part).part_of()
    opts = ReadOptions(line_by_line=line_by_line, **read_options)
    _check_arguments(val_fraction, seed, shard_tokens)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    out_dir = Path(out_dir)
    exclude = [out_dir, *exclude]  # never the shards themselves, nor what the caller writes (a run folder)
    files = resolve_inputs(inputs, opts.extensions, exclude)
    val_files = resolve_inputs(val_inputs, opts.extensions, exclude) if val_inputs else []
    _refuse_overlap(files, val_files)
    from .parts import cut_large  # large text files are several units (data/parts.py), in one prepare too

    files, val_files = cut_large(files, opts.line_by_line), cut_large(val_files, opts.line_by_line)
    # what decides the tokens; `extensions` only chose the files, which are fingerprinted themselves
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(opts).items() if k != "extensions"}
    options.update(val_fraction=0.0 if val_files else val_fraction, seed=seed, shard_tokens=shard_tokens)
    job = dict(tok=tok, opts=opts, options=options, workers=workers, force=force, progress=progress)
    if where is None:
        return _prepare_units(files, val_files, out_dir, expect_same=expect_same, **job)
    from .parts import combine_parts, part_folder, split_inputs

    mine, mine_val, info = split_inputs(files, val_files, *where, [FORMAT, tok.fingerprint, options])
    meta = _prepare_units(mine, mine_val, out_dir / part_folder(*where), part=info, **job)
    combine_parts(out_dir, where[1])  # the last part to finish makes the folder one dataset
    return meta


def _prepare_units(
    files, val_files, out_dir: Path, *, tok, opts, options, workers, force, progress, expect_same=False, part=None
) -> dict:
    """Write the dataset (or with `part`, one part of a dataset) of these inputs into `out_dir`."""
    dtype = token_dtype(tok.vocab_size)
    stamps = {p: p.stat().st_mtime_ns for p in files + val_files if hasattr(p, "stat")}  # before the hash is taken
    inputs_fp = [fingerprint_file(p) for p in files]
    val_fp = [fingerprint_file(p) for p in val_files]
    key = json.dumps(
        [FORMAT, tok.fingerprint, [f["blake2b"] for f in inputs_fp], [f["blake2b"] for f in val_fp], options]
        + ([part] if part else []),
        sort_keys=True,
    )
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    old = _previous(
        out_dir, fingerprint, force, expect_same, lambda m: _what_changed(m, tok, inputs_fp + val_fp, options)
    )
    if old is not None:
        remove_stale(out_dir)  # a killed run's temporary folder beside the reused one
        return {**old, "reused": True}

    started = time.time()
    total = sum(f["bytes"] for f in inputs_fp + val_fp)
    # starting processes costs more than it saves on small inputs
    workers = 1 if total < 4 * JOB_CHARS else min(os.cpu_count() or 1, 8) if workers is None else workers
    bar = _progress_bar(total) if progress else None
    with atomic_dir(out_dir) as tmp:
        writers = {
            s: _ShardWriter(tmp, s, np.dtype(dtype), tok.eos_id, options["shard_tokens"]) for s in ("train", "val")
        }
        try:
            jobs = _jobs(files, val_files, opts, part["units"][0] if part else 0)
            # closed here when routing fails (a full disk): its workers end now, not at garbage collection
            with contextlib.closing(run_jobs(jobs, tok, opts, dtype, workers)) as results:
                _route(results, writers, options["val_fraction"], _Draws(options["seed"]), bar)
            if bar is not None:
                finish(bar)  # the bar counted the text's bytes; the files also hold blank lines and markup
        finally:
            for w in writers.values():
                w.close()
            if bar is not None:
                bar.close()
        _refuse_changed(files + val_files, [*inputs_fp, *val_fp], stamps)
        train, val = writers["train"].summary(), writers["val"].summary()
        if part:  # the fall-backs for too few documents apply to the whole (data/parts.py)
            val_split = "file" if val_files else "documents"
        else:
            fraction = options["val_fraction"]
            val_split = _settle_split(tmp, train, val, files, bool(val_files), fraction, np.dtype(dtype), tok)
        meta = dict(
            format=FORMAT,
            fingerprint=fingerprint,
            dtype=dtype,
            vocab_size=tok.vocab_size,
            eos_id=tok.eos_id,
            tokenizer={"fingerprint": tok.fingerprint, "kind": tok.kind, "source": tok.source},
            inputs=inputs_fp,
            val_inputs=val_fp,
            options=options,
            val_split=val_split,
            workers=workers,
            train=train,
            val=val,
            seconds=round(time.time() - started, 3),
            **({"part": part} if part else {}),
        )
        _write_meta(tmp, meta)
        tok.save(tmp / "tokenizer")  # the exact tokenizer the ids belong to
    return {**meta, "reused": False}


def _check_arguments(val_fraction: float, seed: int, shard_tokens: int) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if not (isinstance(seed, int) and 0 <= seed < 2**63):
        raise DataError(f"--seed {seed!r}: must be an integer from 0 to 2**63 - 1")
    if not (isinstance(shard_tokens, int) and shard_tokens > 0):
        raise DataError(
            f"--shard-tokens {shard_tokens!r}: must be a positive number of tokens (default {SHARD_TOKENS:,})"
        )


def _refuse_changed(paths: list, fingerprints: list[dict], stamps: dict) -> None:
    """What was read is what was fingerprinted: an input written to meanwhile is refused."""
    for path, before in zip(paths, fingerprints):
        now = path.stat() if hasattr(path, "stat") else None
        size = before.get("file_bytes", before["bytes"])  # a block's record holds its file's size too
        if now is not None and (now.st_size != size or now.st_mtime_ns != stamps[path]):
            raise DataError(
                f"{path}: changed while it was read ({before['bytes']:,} bytes before, "
                f"{now.st_size:,} now); prepare again once it is complete"
            )


def _settle_split(
    folder: Path,
    train: dict,
    val: dict,
    files: list,
    val_file: bool,
    val_fraction: float,
    dtype: np.dtype,
    tok: Tokenizer,
) -> str:
    """meta's "val_split": "file" (--val-file), "documents", or "tail" where the draw left a side empty."""
    if train["tokens"] == 0 and not val_file:
        _val_to_train(folder, train, val)  # then the tail split below, as for one document
    if train["tokens"] == 0:
        raise DataError(f"no text left in {', '.join(map(str, files))} after cleaning; check --remove and the inputs")
    if not val_file and val_fraction > 0 and val["tokens"] == 0:
        _carve_tail(folder, train, val, val_fraction, dtype, tok.token_byte_lengths())
        return "tail"
    return "file" if val_file else "documents"


def _write_meta(folder: Path, meta: dict) -> None:
    try:
        text = json.dumps(meta, indent=2, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a file name that is not UTF-8 (its bytes kept as surrogates): escaped
        text = json.dumps(meta, indent=2).encode()
    (folder / "meta.json").write_bytes(text + b"\n")


def _refuse_overlap(files: list, val_files: list) -> None:
    both = {p.resolve() for p in files if isinstance(p, Path)} & {p.resolve() for p in val_files if isinstance(p, Path)}
    if both:
        raise DataError(
            f"{sorted(both)[0]}: is both a training and a validation input; a model is never validated on "
            "what it trained on, so remove it from one of them"
        )


def _previous(out_dir: Path, fingerprint: str, force: bool, expect_same: bool, what_changed) -> dict | None:
    """The meta of an up-to-date dataset already in `out_dir` (to reuse), else None; refuses a folder that
    is not a dataset, and (`expect_same`, a resumed run) a dataset made from other inputs."""
    if not (out_dir.exists() and any(out_dir.iterdir())):
        return None
    old = read_meta(out_dir) if (out_dir / "meta.json").is_file() else None
    if old is None:
        raise DataError(
            f"{out_dir}: folder exists and is not a prepared dataset (no meta.json); "
            "choose a new or empty --out folder so nothing of yours is overwritten"
        )
    if old.get("fingerprint") == fingerprint and not force and shards_complete(out_dir, old):
        return old
    if expect_same and old.get("fingerprint") != fingerprint:
        raise DataError(
            f"{out_dir}: {what_changed(old)} since the run started; resume with the same inputs, "
            "options and tokenizer, or start a new run (--overwrite or another --out)"
        )
    return None


def _what_changed(old: dict, tok: Tokenizer, inputs_fp: list[dict], options: dict) -> str:
    """What differs between a prepared dataset's meta and the inputs, tokenizer and options given now, in words."""
    said = [] if (old.get("tokenizer") or {}).get("fingerprint") == tok.fingerprint else ["the tokenizer changed"]
    before = {f["path"]: f["blake2b"] for f in old.get("inputs", []) + old.get("val_inputs", [])}
    now = {f["path"]: f["blake2b"] for f in inputs_fp}
    for words, paths in (
        ("changed", [p for p in now if p in before and before[p] != now[p]]),
        ("new inputs", [p for p in now if p not in before]),
        ("inputs no longer given", [p for p in before if p not in now]),
    ):
        if paths:
            said.append(f"{words}: {', '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}")
    then = old.get("options") or {}
    differ = sorted(k for k in set(options) | set(then) if options.get(k) != then.get(k))
    if differ:
        said.append(f"options changed: {', '.join(differ)}")
    return "; ".join(said) or "the inputs changed"


def _progress_bar(total_bytes: int):
    return progress_bar(total_bytes, desc="prepare", unit="B", unit_scale=True)


# the reading back lives in tokens.py and is re-exported here
__all__ = ["FORMAT", "ShardedTokens", "load_meta", "load_split", "prepare", "token_dtype"]
