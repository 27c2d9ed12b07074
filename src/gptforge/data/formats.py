"""Rows of table formats as texts: a CSV/TSV column, a JSON Lines or JSON array field, a Parquet column, a
`datasets` dataset's field. Each names the file, row and field of anything that is not text."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from ..options.data import ReadOptions
from .textfile import decoded_blocks, fingerprint, read_lines, split_lines


def rows(path: Path, fmt: str, opts: ReadOptions) -> Iterator[str]:
    """The texts of a table file of format `fmt` ("csv", "tsv", "jsonl", "json" or "parquet")."""
    if fmt in ("csv", "tsv"):
        return _csv_rows(path, opts, "," if fmt == "csv" else "\t")
    return {"jsonl": _jsonl_rows, "json": _json_rows, "parquet": _parquet_rows}[fmt](path, opts)


def _csv_rows(path: Path, opts: ReadOptions, delimiter: str) -> Iterator[str]:
    csv.field_size_limit(sys.maxsize)
    lines = (line for block in decoded_blocks(path, opts.encoding_errors) for line in split_lines(block))
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
    for n, line in enumerate(read_lines(path, opts.encoding_errors), 1):
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
        data = json.loads("".join(decoded_blocks(path, opts.encoding_errors)))
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
            h.update(fingerprint(f)["blake2b"].encode())
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


__all__ = ["HFDataset", "rows"]
