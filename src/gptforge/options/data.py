"""The options of reading and cleaning inputs (`ReadOptions`, which data/ reads by) and of `prepare` (tokenizing
text into token shards; the flags of `gptforge prepare` are made from them)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import DataError, OptionError
from .base import opt

TEXT_EXTENSIONS = (".txt", ".md", ".text", ".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")


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


SHARD_TOKENS = 100_000_000


@dataclass
class PrepareOptions:
    line_by_line: bool = opt(False, "each line / row is one sample wrapped in <|endoftext|>")
    val_fraction: float = opt(0.1, "share of documents for validation")
    seed: int = opt(0, "seed of the train/val split")
    workers: int | None = opt(None, "encoding processes (default: the CPU cores, at most 8)")
    shard_tokens: int = opt(SHARD_TOKENS, "tokens per shard file")
    force: bool = opt(False, "rebuild even when the shards are up to date")
    part: str | None = opt(
        None,
        "I/N: write part I of N (1-based) into --out/part-I-of-N, for N machines or a SLURM array running the "
        "same command; each input file (or 256 MiB block of a large text file) lands in one part. Under torchrun the "
        "part defaults to RANK+1/WORLD_SIZE. The folder is one dataset once every part is written (docs/data.md)",
    )

    def __post_init__(self) -> None:
        self.part_of()  # checked now, before any work

    def part_of(self) -> tuple[int, int] | None:
        """(I, N) of --part (1-based), or None for the whole."""
        if self.part is None:
            return None
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(self.part))
        if not m or not 1 <= int(m[1]) <= int(m[2]):
            raise OptionError(f"--part {self.part!r}: give I/N with 1 <= I <= N, e.g. --part 2/4")
        return int(m[1]), int(m[2])


def torchrun_part() -> str | None:
    """`gptforge prepare` under torchrun: each process writes the part of its rank, RANK+1 of WORLD_SIZE."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"{int(os.environ.get('RANK', '0')) + 1}/{world}" if world > 1 else None


__all__ = ["SHARD_TOKENS", "PrepareOptions", "torchrun_part"]
