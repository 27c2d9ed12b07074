"""Labelled texts for classification: CSV/TSV (columns by name or 0-based index), JSON Lines / JSON arrays
(fields), or a folder with one sub-folder of text files per label; and the stratified validation split.

Every example remembers where it came from (`file:row`), so that a missing label, an unseen label or a text
that tokenizes to nothing is reported at its place. Labels are strings (numbers in JSON become strings);
their order is sorted, never the order of appearance, so the same data gives the same label ids.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import DataError, NotFoundError
from .reading import TEXT_EXTENSIONS
from .textfile import read_lines, read_text_file

TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}


@dataclass
class Labelled:
    """Texts, their labels (None where unlabelled) and where each came from."""

    texts: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    where: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Sequence[int]) -> "Labelled":
        return Labelled([self.texts[i] for i in index], [self.labels[i] for i in index], [self.where[i] for i in index])

    def label_names(self) -> list[str]:
        """The distinct labels, sorted."""
        return sorted({label for label in self.labels if label is not None})

    def counts(self) -> dict[str, int]:
        names, counts = np.unique(np.array(self.labels, dtype=object).astype(str), return_counts=True)
        return dict(zip(names.tolist(), counts.tolist()))


def _key(spec: str | int | None, default: str) -> str | int:
    """A column or field: a name, or a 0-based index (an int, or a string of digits)."""
    if spec is None:
        return default
    return int(spec) if isinstance(spec, int) or str(spec).isdigit() else str(spec)


def _label_text(value, where: str, option: str) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value).strip()
    raise DataError(
        f"{where}: the label is {type(value).__name__} {value!r}; a label is a string or an integer ({option})"
    )


def _csv_rows(
    path: Path, delimiter: str, text_key, label_key, header: bool, errors: str, need_labels: bool = True
) -> Iterator[tuple]:
    csv.field_size_limit(sys.maxsize)
    reader = csv.reader(read_lines(path, errors), delimiter=delimiter)
    names = (next(reader, None) or []) if header else []
    index = []
    for key, option in ((text_key, "--text-field"), (label_key, "--label-field")):
        if isinstance(key, int):
            index.append(key)
        elif option == "--label-field" and not need_labels and key not in names:  # texts to predict: no labels
            index.append(None)
        elif not header:
            raise DataError(
                f"{path}: {option} {key!r} is a name but --no-header says the file has no header; pass a 0-based index"
            )
        elif key not in names:
            raise DataError(
                f"{path}: no column {key!r}; the header has {names}; choose it with {option} NAME or a 0-based index"
            )
        else:
            index.append(names.index(key))
    for row in reader:
        if not row or not any(cell.strip() for cell in row):
            continue
        where = f"{path}:{reader.line_num}"
        if index[0] >= len(row):
            raise DataError(f"{where}: the row has {len(row)} columns, no text column {index[0]}; check --text-field")
        yield row[index[0]], row[index[1]] if index[1] is not None and index[1] < len(row) else None, where


def _json_rows(path: Path, fmt: str, text_key, label_key, errors: str) -> Iterator[tuple]:
    data = None
    if fmt == "json":
        try:
            data = json.loads("".join(read_lines(path, errors)))
        except json.JSONDecodeError:
            data = None  # JSON Lines under a .json name
        if isinstance(data, list):
            rows = ((f"{path}[{i}]", row) for i, row in enumerate(data))
        elif data is not None:
            raise DataError(f"{path}: holds a JSON {type(data).__name__}, not an array of objects or JSON Lines")
    if data is None:
        rows = ((f"{path}:{n}", line) for n, line in enumerate(read_lines(path, errors), 1) if line.strip())
    for where, row in rows:
        if isinstance(row, str):
            try:
                row = json.loads(row)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}: not valid JSON ({e.msg}); each line of a .jsonl file must be one JSON object"
                ) from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: holds a JSON {type(row).__name__}, not an object with a text and a label field")
        if str(text_key) not in row:
            raise DataError(
                f"{where}: no text field {text_key!r} (found {sorted(row)}); choose it with --text-field NAME"
            )
        text = row[str(text_key)]
        if not isinstance(text, str):
            raise DataError(
                f"{where}: the field {text_key!r} holds {type(text).__name__}, not text; "
                "choose it with --text-field NAME"
            )
        yield text, row.get(str(label_key)), where


def _folder_rows(folder: Path, extensions: Sequence[str], errors: str) -> Iterator[tuple]:
    """One sub-folder per label; every text file below it is one example."""
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in sub.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
        if not files:
            raise NotFoundError(
                f"{sub}: the folder of label {sub.name!r} holds no files ending in {', '.join(extensions)}"
            )
        for f in files:
            yield read_text_file(f, errors).strip("\r\n"), sub.name, str(f)


def read_labelled(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    text_field: str | int | None = "text",
    label_field: str | int | None = "label",
    *,
    header: bool = True,
    encoding_errors: str = "strict",
    need_labels: bool = True,
    extensions: Sequence[str] = TEXT_EXTENSIONS,
) -> Labelled:
    """The examples of `inputs`: .csv/.tsv files, .jsonl/.json files, or folders with a sub-folder per label.

    `text_field` / `label_field` name the CSV column (header name or 0-based index) or JSON field. With
    `need_labels`, a row whose label is missing or empty is an error naming the row; without, it is kept
    with label None (texts to predict)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise DataError(
            "no inputs given; name .csv, .tsv, .jsonl or .json files, or a folder with a sub-folder per label"
        )
    text_key, label_key = _key(text_field, "text"), _key(label_field, "label")
    out = Labelled()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            rows = _folder_rows(path, extensions, encoding_errors)
        elif not path.is_file():
            raise NotFoundError(f"{path}: no such file or folder")
        elif path.suffix.lower() not in TABLE_FORMATS:
            raise DataError(
                f"{path}: labelled examples come in .csv, .tsv, .jsonl or .json files, or a folder with a "
                "sub-folder of text files per label"
            )
        elif TABLE_FORMATS[path.suffix.lower()] in ("csv", "tsv"):
            rows = _csv_rows(
                path,
                "," if path.suffix.lower() == ".csv" else "\t",
                text_key,
                label_key,
                header,
                encoding_errors,
                need_labels,
            )
        else:
            rows = _json_rows(path, TABLE_FORMATS[path.suffix.lower()], text_key, label_key, encoding_errors)
        before = len(out)
        for text, label, where in rows:
            label = _label_text(label, where, "--label-field")
            if label is None and need_labels:
                raise DataError(
                    f"{where}: no label (the {label_field!r} field is missing or empty); give every row a "
                    "label, or choose the label column with --label-field"
                )
            out.texts.append(text)
            out.labels.append(label)
            out.where.append(where)
        if len(out) == before:
            raise DataError(f"{path}: no examples in it (only blank rows)")
    return out


def check_classes(data: Labelled, source: str) -> list[str]:
    """The sorted labels of training data; an error when there are fewer than two."""
    names = data.label_names()
    if len(names) < 2:
        found = f"only the class {names[0]!r}" if names else "no labels"
        raise DataError(f"{source}: {found}; a classifier needs examples of at least two classes")
    return names


def check_known(data: Labelled, known: Sequence[str], source: str) -> None:
    """Every label of `data` is one the model knows."""
    known_set = set(known)
    for label, where in zip(data.labels, data.where):
        if label is not None and label not in known_set:
            raise DataError(
                f"{where}: label {label!r} was never seen in training; the model knows {', '.join(known)} ({source})"
            )


def stratified_split(labels: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices (train, validation): about `fraction` of each label's examples to validation, at least one of
    every label with two or more examples, never a label's last one; seeded, order kept."""
    if not 0 <= fraction < 1:
        raise DataError(f"--val-fraction {fraction}: must be at least 0 and below 1")
    rng = np.random.default_rng(seed)
    labels_arr = np.array(labels, dtype=object)
    val: list[int] = []
    for label in sorted(set(labels)):
        idx = np.flatnonzero(labels_arr == label)
        n_val = min(len(idx) - 1, max(1, round(len(idx) * fraction))) if fraction > 0 else 0
        val += rng.permutation(idx)[:n_val].tolist()
    val_set = set(val)
    return [i for i in range(len(labels)) if i not in val_set], sorted(val)


__all__ = ["Labelled", "check_classes", "check_known", "read_labelled", "stratified_split"]
