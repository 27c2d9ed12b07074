"""Flags that several commands share: the reading and cleaning group (tokenizer train, prepare, train), the
inputs they name, and the help of --adapter and --quantize."""

from __future__ import annotations

import argparse

ADAPTER_HELP = (
    "a LoRA adapter folder (gptforge's or peft's) to apply to the model, merged on load; see docs/adapters.md"
)
QUANTIZE_HELP = "int8: int8 weights made on load (faster on CPUs, slightly different numbers); see docs/guide.md"


def inputs_of(args: argparse.Namespace, items: list) -> list:
    """The inputs named on the command line, and the --hf-dataset one."""
    from ..data.formats import HFDataset

    return list(items) + ([HFDataset(args.hf_dataset, args.split)] if args.hf_dataset else [])


def read_options(args: argparse.Namespace) -> dict:
    """ReadOptions keywords from the shared reading/cleaning flags."""
    column = args.column
    if column is not None and column.isdigit():
        column = int(column)
    opts = dict(
        column=column,
        header=not args.no_header,
        field=args.field,
        encoding_errors=args.encoding_errors,
        nfc=args.nfc,
        drop_control=args.drop_control,
        remove=tuple(args.remove or ()),
        dedupe=args.dedupe,
    )
    if args.ext:
        opts["extensions"] = tuple(e.strip() for e in args.ext.split(",") if e.strip())
    return opts


def read_flags(p: argparse.ArgumentParser, g=None) -> None:
    """The reading and cleaning options (data.reading.ReadOptions) shared by the commands that read text
    (tokenizer train, prepare, train), in their own group or in `g`."""
    from ..data.reading import TEXT_EXTENSIONS

    g = g or p.add_argument_group("reading and cleaning")
    g.add_argument(
        "--hf-dataset",
        metavar="NAME_OR_PATH",
        help="also read this `datasets` dataset: a local folder "
        "(save_to_disk; works offline) or a hub name (needs the datasets package)",
    )
    g.add_argument("--split", default="train", help="--hf-dataset: the split to read (default: train)")
    g.add_argument("--column", help="CSV/TSV: text column, by header name or 0-based index; Parquet: column name")
    g.add_argument("--no-header", action="store_true", help="CSV/TSV: the first row is data, not column names")
    g.add_argument(
        "--field",
        default="text",
        help="JSON Lines, JSON arrays, Parquet, --hf-dataset: field holding the text (default: text)",
    )
    g.add_argument(
        "--ext", help=f"file types taken from folders, comma-separated (default: {','.join(TEXT_EXTENSIONS)})"
    )
    g.add_argument(
        "--encoding-errors",
        choices=("strict", "replace"),
        default="strict",
        help="invalid UTF-8: stop with the file and byte offset (strict), or replace it with U+FFFD",
    )
    g.add_argument("--nfc", action="store_true", help="Unicode NFC normalisation")
    g.add_argument("--drop-control", action="store_true", help="remove control characters (keeps tabs and newlines)")
    g.add_argument(
        "--remove",
        action="append",
        metavar="REGEX",
        help="delete matches of this regex (repeatable), "
        "e.g. --remove '^[ \\t]*\\d+[ \\t]*(\\n|$)' for page-number lines",
    )
    g.add_argument("--dedupe", action="store_true", help="drop exact duplicate documents / lines")
