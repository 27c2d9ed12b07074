"""Reading inputs: files, folders, globs, CSV/TSV, JSON Lines, JSON arrays, Parquet and `datasets` datasets in,
documents out, cleaned on request.

Files are read in blocks of whole lines, so memory stays bounded whatever their size; invalid UTF-8 is
reported with its exact byte offset, binary and empty files by name. A document is a blank-line block
of a text file (a line with `line_by_line`), a CSV row's column, or a row's field (JSON, Parquet, datasets).
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

TEXT_EXTENSIONS = (".txt", ".md", ".text", ".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")
# a folder holding both files of a pair is a model or tokenizer (transformers', gptforge's) or a gptforge run: not text
WRITTEN_MARKERS = (
    ("tokenizer.json", "tokenizer_config.json"),
    ("tokenizer.json", "config.json"),
    ("run_config.json", "metrics.jsonl"),
)
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
        self.extensions = tuple(
            (e if e.startswith(".") else "." + e).lower() for e in self.extensions
        )  # as the files' suffixes
        self.remove = tuple(self.remove)
        for pattern in self.remove:
            try:
                re.compile(pattern)
            except re.error as e:
                raise DataError(f"--remove {pattern!r} is not a valid regular expression ({e})") from None


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
    """Content hash (not timestamps), so a copied file reuses shards and an edited one rebuilds them."""
    if not isinstance(path, Path):  # a Hugging Face dataset, or a FileBlock (data/parts.py): its own
        return path.fingerprint()
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(BLOCK_BYTES):
            h.update(block)
    return {"path": str(path), "bytes": path.stat().st_size, "blake2b": h.hexdigest()}


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


def _decoded_blocks(path: Path, errors: str, split_long_lines: bool = False) -> Iterator[str]:
    """Text of `path` in blocks of whole lines; names the byte offset of invalid UTF-8 and rejects binary files.

    With `split_long_lines`, a line longer than MAX_PIECE_CHARS is passed on in parts, so memory stays
    bounded even for text without line breaks.
    """
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty; remove it from the inputs")
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    offset, carry = getattr(path, "start", 0), ""  # a FileBlock (data/parts.py) is a byte range of its file
    stop = getattr(path, "stop", None)
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            block = f.read(BLOCK_BYTES if stop is None else min(BLOCK_BYTES, stop - offset))
            if offset == 0 and block[:2] in (b"\xff\xfe", b"\xfe\xff"):
                raise DataError(
                    f"{path}: UTF-16 text (it starts with a UTF-16 byte order mark); save it as UTF-8 "
                    "(e.g. iconv -f UTF-16 -t UTF-8), which gptforge reads"
                )
            if NUL in block:
                raise DataError(
                    f"{path}: NUL byte at byte {offset + block.index(NUL)}; this looks like a binary "
                    "file, not text (remove it from the inputs)"
                )
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
            try:
                text = carry + decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: invalid UTF-8 at byte {offset - pending + e.start}; "
                    "convert the file to UTF-8 or pass --encoding-errors replace"
                ) from None
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


_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")


def _lines(block: str) -> list[str]:
    """Lines with their ends, broken at \n, \r\n and \r only: U+2028, U+0085 and the other breaks that
    str.splitlines() knows are text inside a JSON string or a CSV field, not the end of a row."""
    return _LINE.findall(block)


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


def _csv_rows(path: Path, opts: ReadOptions, delimiter: str) -> Iterator[str]:
    csv.field_size_limit(sys.maxsize)
    lines = (line for block in _decoded_blocks(path, opts.encoding_errors) for line in _lines(block))
    reader = csv.reader(lines, delimiter=delimiter)
    index = opts.column if isinstance(opts.column, int) else None
    if opts.header:
        header = next(reader, None) or []
        if isinstance(opts.column, str):
            if opts.column not in header:
                raise DataError(
                    f"{path}: no column {opts.column!r}; the header has {header}; pass --column NAME or an index"
                )
            index = header.index(opts.column)
        elif opts.column is None:
            if len(header) != 1:
                raise DataError(f"{path}: {len(header)} columns {header}; choose the text column with --column NAME")
            index = 0
    else:
        if isinstance(opts.column, str):
            raise DataError(
                f"{path}: --column {opts.column!r} is a name but --no-header says the file has no header; "
                "pass a 0-based index instead"
            )
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
        for line in _lines(block):
            n += 1
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{n}: not valid JSON ({e.msg}); each line of a .jsonl file must be one JSON value"
                ) from None
            text = _row_text(row, opts.field, f"{path}:{n}", opts.encoding_errors)
            if text.strip():
                yield text


_SURROGATE = re.compile("[\ud800-\udfff]")


def _row_text(row, field: str, where: str, errors: str = "strict") -> str:
    """The text of one row: a string, or an object's `field`; an error that says what to do otherwise.
    A lone surrogate escape ("\\ud83d", half an emoji, common in scraped JSON) is no character and UTF-8
    cannot hold it: refused naming the row, or U+FFFD with `errors="replace"`."""
    if not isinstance(row, str):
        if not isinstance(row, dict) or field not in row:
            found = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{where}: no text field {field!r} (found {found}); choose it with --field NAME")
        row = _text_value(row[field], field, where)
    bad = _SURROGATE.search(row)
    if bad is None:
        return row
    if errors == "replace":
        return _SURROGATE.sub("\ufffd", row)
    raise DataError(
        f"{where}: a lone surrogate escape (\\u{ord(bad.group()):04x}) in the text, half of a character; "
        "fix the row, or pass --encoding-errors replace to read it as U+FFFD"
    )


def _text_value(value, field: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        raise DataError(
            f"{where}: the field {field!r} holds a list of chat messages, not text; gptforge trains on "
            "plain text: write each conversation as one string (e.g. 'role: content' lines, or its chat "
            "template applied) into a field of its own and pass --field NAME"
        )
    raise DataError(
        f"{where}: the field {field!r} holds {type(value).__name__}, not text; choose a text field with --field NAME"
    )


def _json_rows(path: Path, opts: ReadOptions) -> Iterator[str]:
    """A .json file: an array of strings or of objects (a JSON Lines file named .json is read as one)."""
    try:
        data = json.loads("".join(_decoded_blocks(path, opts.encoding_errors)))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            yield from _jsonl_rows(path, opts)
            return
        raise DataError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}); a .json input holds an array of strings or objects"
        ) from None
    if not isinstance(data, list):
        found = f"an object with keys {sorted(data)[:8]}" if isinstance(data, dict) else type(data).__name__
        raise DataError(
            f"{path}: holds {found}, not an array; gptforge reads an array of strings or of objects "
            "(with --field NAME), or JSON Lines"
        )
    for i, row in enumerate(data):
        text = _row_text(row, opts.field, f"{path}[{i}]", opts.encoding_errors)
        if text.strip():
            yield text


def _text_column(names: list[str], opts: ReadOptions, where: str) -> str:
    name = opts.column if isinstance(opts.column, str) else opts.field
    if name not in names:
        raise DataError(f"{where}: no column {name!r}; it has {names}; choose it with --field NAME")
    return name


def _parquet_rows(path: Path, opts: ReadOptions) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'gptforge[data]'") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid and OSError for damaged files
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:200]})") from None
    name = _text_column(table.schema_arrow.names, opts, str(path))
    for batch in table.iter_batches(columns=[name], batch_size=1024):
        for value in batch.column(0).to_pylist():
            text = _text_value(value, name, str(path))
            if text.strip():
                yield text


@dataclass(frozen=True)
class HFDataset:
    """A split of a `datasets` library dataset: a local folder (written by `save_to_disk`, or of data files),
    or a hub name, which is downloaded only because it was named."""

    name: str
    split: str = "train"

    def __str__(self) -> str:
        return f"{self.name}[{self.split}]"

    def load(self):
        try:
            import datasets
        except ImportError:
            raise DataError(
                f"--hf-dataset {self.name}: needs the datasets package: pip install 'gptforge[data]'"
            ) from None
        try:
            if (Path(self.name) / "dataset_info.json").is_file() or (Path(self.name) / "dataset_dict.json").is_file():
                ds = datasets.load_from_disk(self.name)
            else:
                ds = datasets.load_dataset(self.name, split=self.split)
        except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
            raise DataError(
                f"--hf-dataset {self.name}: cannot load it ({str(e).splitlines()[0][:200]}); without network "
                "access, save it elsewhere with `Dataset.save_to_disk(DIR)` and pass the local folder"
            ) from None
        if isinstance(ds, datasets.DatasetDict):
            if self.split not in ds:
                raise DataError(
                    f"--hf-dataset {self.name}: no split {self.split!r}; it has {list(ds)}; choose one with --split"
                )
            ds = ds[self.split]
        return ds

    def fingerprint(self) -> dict:
        ds = self.load()
        h = hashlib.blake2b(str(self).encode(), digest_size=16)
        files = [Path(f["filename"]) for f in ds.cache_files]
        for f in files:
            h.update(fingerprint_file(f)["blake2b"].encode())
        if not files:  # an in-memory dataset: hash its table
            h.update(str(ds.data.to_pydict()).encode())
        return {"path": str(self), "bytes": int(ds.data.nbytes), "blake2b": h.hexdigest()}

    def rows(self, opts: ReadOptions) -> Iterator[str]:
        ds = self.load()
        name = _text_column(ds.column_names, opts, f"--hf-dataset {self}")
        for batch in ds.select_columns([name]).iter(batch_size=1024):
            for value in batch[name]:
                text = _text_value(value, name, f"--hf-dataset {self}")
                if text.strip():
                    yield text


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
        elif fmt in ("csv", "tsv"):
            batches = _batched(_csv_rows(path, opts, "," if fmt == "csv" else "\t"))
        else:
            batches = _batched({"jsonl": _jsonl_rows, "json": _json_rows, "parquet": _parquet_rows}[fmt](path, opts))
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


def read_lines(path: str | os.PathLike, errors: str = "strict") -> Iterator[str]:
    """The lines of a UTF-8 file (line ends kept), read in blocks with the checks every reader makes (missing,
    empty, binary, bad UTF-8 with its byte offset); for readers of their own formats (data/labelled.py)."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file")
    for block in _decoded_blocks(path, errors):
        yield from _lines(block)


__all__ = [
    "HFDataset",
    "JOB_CHARS",
    "ReadOptions",
    "TEXT_EXTENSIONS",
    "clean",
    "fingerprint_file",
    "iter_pieces",
    "iter_texts",
    "read_lines",
    "read_text_file",
    "resolve_inputs",
    "split_long",
]
