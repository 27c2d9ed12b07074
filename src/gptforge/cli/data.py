"""The commands that turn text into what training reads: tokenizer train, prepare."""

from __future__ import annotations

import argparse
import os

from ..errors import RunFolderError
from ..options import PrepareOptions, TokenizerOptions
from ..options.flags import add_dataclass_options, option_values
from .args import inputs_of, read_flags, read_options


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data.vocabulary import train_tokenizer
    from ..tokenizer import TOKENIZER_FILES

    out, options = Path(args.out), option_values(args, TokenizerOptions)
    force = options.pop("force")  # the command's own: train_tokenizer writes where it is told
    existing = [f for f in TOKENIZER_FILES if (out / f).exists()]
    if existing and not force:
        raise RunFolderError(
            f"{out}: already holds {', '.join(existing)}; pass --force to replace them or choose another --out"
        )
    tok = train_tokenizer(
        inputs_of(args, args.files),
        out_dir=out,
        progress=True,
        **options,
        **read_options(args),
    )
    print(
        f"trained a {tok.kind} tokenizer with {tok.vocab_size} tokens (eos id {tok.eos_id}, "
        f"fingerprint {tok.fingerprint}) into {out}"
    )
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from ..data.shards import prepare
    from ..options.data import torchrun_part

    options = option_values(args, PrepareOptions)
    options["part"] = options["part"] or torchrun_part()  # under torchrun, each rank its own part
    meta = prepare(
        inputs_of(args, args.inputs),
        args.tokenizer,
        args.out,
        val_inputs=args.val_file,
        progress=not args.quiet,
        **options,
        **read_options(args),
    )
    if meta.get("part"):
        done = os.path.isfile(os.path.join(args.out, "meta.json"))
        print(f"part {meta['part']['index']} of {meta['part']['of']}" + (": every part is written" * done))
    if meta["reused"]:
        print(f"{args.out}: up to date with the inputs and tokenizer; reused (pass --force to rebuild)")
    for split in ("train", "val"):
        m = meta[split]
        print(
            f"{split}: {m['tokens']:,} tokens, {m['documents']:,} documents, {m['bytes']:,} bytes, "
            f"{len(m['shards'])} shard(s)"
        )
    if meta["val_split"] == "tail":
        print(
            "note: too few documents to split by document; val is the last "
            f"{meta['options']['val_fraction']:.0%} of the text (separate documents with blank lines, or pass "
            "--val-file)"
        )
    if not meta["reused"]:
        mb = sum(f["bytes"] for f in meta["inputs"] + meta["val_inputs"]) / 1e6
        print(
            f"wrote {args.out} ({meta['dtype']}) in {meta['seconds']:.1f}s, {mb / max(meta['seconds'], 1e-9):.1f} MB/s"
        )
    return 0


def add_data_commands(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE or a character vocabulary on your text")
    t.add_argument("files", nargs="*", help="text files, folders, globs, .csv/.tsv, .jsonl, .json or .parquet")
    t.add_argument("--out", required=True, help="folder to write the tokenizer files into")
    add_dataclass_options(t, TokenizerOptions)
    read_flags(t)
    t.set_defaults(func=cmd_tokenizer_train, parser=t)

    p = sub.add_parser("prepare", help="tokenize text into train/val token shards")
    p.add_argument(
        "inputs", nargs="*", help="text files, folders (recursive), globs, .csv/.tsv, .jsonl, .json or .parquet"
    )
    p.add_argument("--tokenizer", required=True, help="tokenizer folder, tokenizer.json, vocab.json or model folder")
    p.add_argument("--out", required=True, help="dataset folder to write (train_*.bin, val_*.bin, meta.json)")
    p.add_argument("--val-file", action="append", help="validation text instead of a split (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_dataclass_options(p, PrepareOptions)
    read_flags(p)
    p.set_defaults(func=cmd_prepare, parser=p)
