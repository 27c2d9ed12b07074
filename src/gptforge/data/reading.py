"""Reading inputs: files, folders, globs, CSV/TSV and JSON Lines in, documents out, cleaned on request.

Files are read in blocks of whole lines, so memory stays bounded whatever their size; invalid UTF-8 is
reported with its exact byte offset, binary and empty files by name. A document is a blank-line block
of a text file (a line with `line_by_line`), a CSV row's column or a JSON Lines row's field.
"""
from __future__ import annotations

import codecs
import csv
import glob as globlib
import hashlib
import json
import os
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import DataError, NotFoundError

TEXT_EXTENSIONS = (".txt", ".md", ".text", ".csv", ".tsv", ".jsonl", ".ndjson")
BLOCK_BYTES = 1 << 20  # bytes read at a time
JOB_CHARS = 1 << 20  # characters of text per batch of documents handed on
MAX_PIECE_CHARS = 16 << 20  # a document longer than this is passed on in pieces (cut where the ids cannot change)
NUL = b"\x00"
_BLANK_LINES = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")
# Where GPT-2's pre-tokenizer always starts a new pre-token, whatever the text around: after a line break
# between two non-space characters, before a single space between two non-space characters, or between a
# letter and punctuation (Chinese text has neither spaces nor, sometimes, line breaks).
_SAFE_CUT = re.compile(r"(?<=\S)\r?\n(?=\S)|(?<=\S)(?= \S)|(?<=[^\W\d_])(?=[^\w\s])")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff]")


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
                raise NotFoundError(f"{path}: folder has no files ending in {', '.join(extensions)}; "
                                        "add --ext for other extensions")
            files += found
        elif path.is_file():
            files.append(path)
        elif any(c in str(item) for c in "*?["):
            found = sorted(Path(p) for p in globlib.glob(str(item), recursive=True) if os.path.isfile(p))
            if not found:
                raise NotFoundError(f"{item}: the pattern matches no files")
            files += found
        else:
            raise NotFoundError(f"{path}: no such file or folder")
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


def read_text_file(path: str | os.PathLike, errors: str = "strict") -> str:
    """A whole UTF-8 text file, with the same checks as every other reader (missing, empty, binary, bad
    UTF-8 with its byte offset, no text at all)."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file")
    text = "".join(_decoded_blocks(path, errors))
    if not text.strip():
        raise DataError(f"{path}: no text in this file (only blank lines); remove it from the inputs")
    return text


__all__ = ["JOB_CHARS", "ReadOptions", "TEXT_EXTENSIONS", "clean", "fingerprint_file", "iter_pieces", "iter_texts",
           "read_text_file", "resolve_inputs"]
