"""Reading inputs: files, folders, globs, CSV/TSV, JSON Lines, JSON arrays, Parquet and `datasets` datasets in,
documents out, cleaned on request.

Files are read in blocks of whole lines, so memory stays bounded whatever their size; invalid UTF-8 is
reported with its exact byte offset, binary and empty files by name. A document is a blank-line block
of a text file (a line with `line_by_line`), a CSV row's column, or a row's field (JSON, Parquet, datasets).
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import re
import unicodedata
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import DataError, NotFoundError
from ..options.data import TEXT_EXTENSIONS, ReadOptions
from . import formats, textfile
from .formats import HFDataset
from .textfile import decoded_blocks, fingerprint

# a folder holding both files of a pair is a model or tokenizer (transformers', gptforge's) or a gptforge run: not text
WRITTEN_MARKERS = (
    ("tokenizer.json", "tokenizer_config.json"),
    ("tokenizer.json", "config.json"),
    ("run_config.json", "metrics.jsonl"),
)
JOB_CHARS = 1 << 20  # characters of text per batch of documents handed on
_BLANK_LINES = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")
# Where GPT-2's pre-tokenizer always starts a new pre-token, whatever the text around: after a line break
# between two non-space characters, before a single space between two non-space characters, or between a
# letter and punctuation (Chinese text has neither spaces nor, sometimes, line breaks).
_SAFE_CUT = re.compile(r"(?<=\S)\r?\n(?=\S)|(?<=\S)(?= \S)|(?<=[^\W\d_])(?=[^\w\s])")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff]")


# --- finding and fingerprinting inputs -------------------------------------------------------------------


def resolve_inputs(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    extensions: Sequence[str] = TEXT_EXTENSIONS,
    exclude: Sequence[str | os.PathLike] = (),
) -> list[Path]:
    """Files named by `inputs`: files as given, folders searched recursively by extension, glob patterns.
    A folder or pattern never descends into a folder of `exclude` that lies inside it (the folders a command
    writes: `gptforge train .` must not read its own run folder's tokenizer and checkpoints as text; a folder
    named inside the output, or the output itself, is read as given), and a folder search skips the folders
    gptforge and transformers write (`tokenizer.json` with `tokenizer_config.json` or `config.json`, or
    `run_config.json` with `metrics.jsonl`: models, tokenizers, runs), whose merges.txt and metrics.jsonl are
    not the user's text."""
    if isinstance(inputs, (str, os.PathLike, HFDataset)):
        inputs = [inputs]
    if not inputs:
        raise DataError("no inputs given; name text files, folders or glob patterns")
    outs = [Path(e).resolve() for e in exclude if e is not None]

    def inside(top: Path) -> list[Path]:  # the excluded folders that lie strictly inside `top`, the searched root
        root = top.resolve()
        return [o for o in outs if root in o.parents]

    def ours(p: Path, skip: list[Path]) -> bool:
        if not skip:
            return False
        real = p.resolve()
        return any(real == o or o in real.parents for o in skip)

    written: dict[Path, bool] = {}

    def in_written(p: Path, top: Path) -> bool:
        for d in list(p.relative_to(top).parents)[:-1]:  # the folders between `top` (named by the user) and the file
            d = top / d
            if d not in written:
                written[d] = any(all((d / name).is_file() for name in pair) for pair in WRITTEN_MARKERS)
            if written[d]:
                return True
        return False

    files: list[Path] = []
    for item in inputs:
        if isinstance(item, HFDataset):
            files.append(item)
            continue
        path = Path(item)
        if path.is_dir():
            skip = inside(path)
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in extensions
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and not ours(p, skip)
                and not in_written(p, path)
            )
            if not found:
                raise NotFoundError(
                    f"{path}: folder has no files ending in {', '.join(extensions)}; add --ext for other extensions"
                )
            files += found
        elif path.is_file():
            files.append(path)
        elif any(c in str(item) for c in "*?["):
            root = Path(re.split(r"[*?\[]", str(item))[0] or ".")  # the folder the pattern starts from
            skip = inside(root if root.is_dir() else root.parent)
            found = sorted(
                Path(p)
                for p in globlib.glob(str(item), recursive=True)
                if os.path.isfile(p) and not ours(Path(p), skip)
            )
            if not found:
                raise NotFoundError(f"{item}: the pattern matches no files")
            files += found
        else:
            raise NotFoundError(f"{path}: no such file or folder")
    return _each_once(files)


def _each_once(files: list) -> list:
    """Each real file once, at its first place: a `**` glob through a symlink loop, or a file named twice,
    would otherwise be read again and again (and land in both train and validation)."""
    seen, unique = set(), []
    for f in files:
        key = f.resolve() if isinstance(f, Path) else id(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def fingerprint_file(path: Path) -> dict:
    """Content hash (not timestamps) of a file or a `datasets` dataset: a copy reuses shards, an edit rebuilds them."""
    # a Hugging Face dataset, or a FileBlock (data/parts.py), has its own
    return fingerprint(path) if isinstance(path, Path) else path.fingerprint()


# --- reading: files -> documents -----------------------------------------------------------------------


def format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    return {
        ".csv": "csv",
        ".tsv": "tsv",
        ".jsonl": "jsonl",
        ".ndjson": "jsonl",
        ".json": "json",
        ".parquet": "parquet",
    }.get(suffix, "text")


def _text_pieces(path: Path, opts: ReadOptions) -> Iterator[tuple[list[str], list[bool]]]:
    """Batches of (texts, ends_document) of a plain text file, one batch per block read."""
    carry = ""
    for block in decoded_blocks(path, opts.encoding_errors, split_long_lines=not opts.line_by_line):
        if opts.line_by_line:
            texts = [line.rstrip("\r") for line in block.split("\n") if line and not line.isspace()]
            yield texts, [True] * len(texts)
            continue
        parts = _BLANK_LINES.split(carry + block)
        carry = parts.pop()
        texts = [p.strip("\r\n") for p in parts if p and not p.isspace()]
        ends = [True] * len(texts)
        if (
            len(carry) > textfile.MAX_PIECE_CHARS
        ):  # one enormous document: pass it on in pieces the tokenizer cannot tell apart
            m = _SAFE_CUT.search(carry, len(carry) // 2)
            if m:
                texts.append(carry[: m.end()].lstrip("\r\n"))
                ends.append(False)
                carry = carry[m.end() :]
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


def iter_pieces(files: Sequence[Path], opts: ReadOptions) -> Iterator[tuple[list[str], list[bool]]]:
    """Batches of (texts, ends_document) covering every document of every file in order, uncleaned.

    A text is a whole document unless its `ends_document` is False (a piece of an enormous document that
    the next text continues). Memory stays bounded by the block size.
    """
    for path in files:
        fmt = "hf" if isinstance(path, HFDataset) else format_of(path)
        if fmt == "hf":
            batches = _batched(path.rows(opts))
        elif fmt == "text":
            batches = _text_pieces(path, opts)
        else:
            batches = _batched(formats.rows(path, fmt, opts))
        empty = True
        for texts, ends in batches:
            if texts:
                empty = False
                yield texts, ends
        if empty:
            raise DataError(f"{path}: no text in this file (only blank lines or empty rows); remove it from the inputs")


def split_long(text: str, limit: int = JOB_CHARS) -> Iterator[str]:
    """`text` in pieces of about `limit` characters, cut only where GPT-2's pre-tokenizer always starts a new
    pre-token, so a BPE trainer counts the same words with bounded memory (a text with no such place stays whole)."""
    start = 0
    while len(text) - start > limit:
        m = _SAFE_CUT.search(text, start + limit // 2, start + limit) or _SAFE_CUT.search(text, start + limit)
        if m is None:
            break
        yield text[start : m.end()]
        start = m.end()
    yield text[start:]


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


def iter_texts(inputs, progress: bool = False, exclude: Sequence = (), **options) -> Iterator[str]:
    """Cleaned documents (whole) of `inputs`, as `prepare` sees them; used to train tokenizers on the same text.
    `progress` shows a bar over the inputs' bytes; `exclude` as for `resolve_inputs`."""
    from ..progress import finish, progress_bar

    opts = options.pop("options", None) or ReadOptions(**options)
    pending, seen = [], set()
    files = resolve_inputs(inputs, opts.extensions, exclude)
    total = sum(f.stat().st_size for f in files if isinstance(f, Path))
    bar = progress_bar(total or None, desc="reading", unit="B", unit_scale=True, enabled=progress)
    for texts, ends in iter_pieces(files, opts):
        bar.update(sum(map(len, texts)))  # characters: bytes for ASCII, an estimate otherwise
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
    finish(bar)


__all__ = [
    "JOB_CHARS",
    "ReadOptions",
    "TEXT_EXTENSIONS",
    "clean",
    "fingerprint_file",
    "iter_pieces",
    "iter_texts",
    "resolve_inputs",
    "split_long",
]
