"""The command line's option builders that several commands share: flags made from options dataclasses,
the reading and cleaning group (tokenizer train, prepare, train), and `gptforge train`'s grouped options."""

from __future__ import annotations

import argparse


def add_dataclass_options(parser: argparse.ArgumentParser, cls, groups: dict | None = None) -> None:
    """One --option per field of an options dataclass (help, choices and flag name from the field), so the
    CLI and the Python API share their names and defaults. `groups` maps group titles to argument groups;
    a field goes to the group options.TRAIN_GROUPS names for it. The help ends with the default, once."""
    import dataclasses

    from .options import TRAIN_GROUPS, parse_duration

    group_of = {name: title for title, names in TRAIN_GROUPS.items() for name in names}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        flag = "--" + (meta.get("flag") or f.name).replace("_", "-")
        where = (groups or {}).get(group_of.get(f.name), parser)
        if f.type in ("bool", bool, "bool | None"):
            action = where.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=meta.get("help", "")
            )
            shown = None if f.default is None else "on" if f.default else "off"
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
            if f.name == "max_time":
                kind = _argparse_type(parse_duration)
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            action = where.add_argument(
                flag, dest=f.name, type=kind, default=default, choices=meta.get("choices"), help=meta.get("help", "")
            )
            shown = default if default != [] else None
        if shown is not None and shown != "" and "default" not in action.help:
            action.help += f" (default: {shown})"


def _argparse_type(parse):
    """`parse` as an argparse type whose error message is shown (argparse hides a ValueError's own words)."""

    def kind(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    kind.__name__ = parse.__name__
    return kind


def option_values(args: argparse.Namespace, cls) -> dict:
    """The fields of an options dataclass as the parsed arguments give them."""
    import dataclasses

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}


def inputs_of(args: argparse.Namespace, items: list) -> list:
    """The inputs named on the command line, and the --hf-dataset one."""
    from .data.reading import HFDataset

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
    from .data.reading import TEXT_EXTENSIONS

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


TRAIN_EXAMPLES = """examples:
  gptforge train corpus.txt --max-time 10m --out run                 # raw text: tokenizer, data, size chosen
  gptforge train recipes.jsonl --field instructions --line-by-line --epochs 3 --out run
  gptforge train --hf-dataset ./my_dataset --split train --max-steps 2000 --out run
  gptforge train --init gpt2 --train-file book.txt --block-size 512 --epochs 2 --out run
  gptforge train --config run.yaml --lr 3e-4                          # a file of options; flags win
  gptforge train corpus.txt --max-time 1h30m --report-to tensorboard,wandb --out run
  gptforge train --init gpt2 book.txt --lora-r 8 --epochs 1 --out adapter     # LoRA: saves a peft adapter folder
  gptforge train --init gpt2 chat.jsonl --lora-r 8 --epochs 3 --out bot       # prompt/completion or messages lines
  gptforge train prefs.jsonl --init bot --preference dpo --beta 0.1 --max-time 20m --out dpo  # prompt/chosen/rejected
"""


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """`gptforge train`'s options, in groups (options.TRAIN_GROUPS), the reading group shared with prepare."""
    from .config import ACTIVATIONS, PRESETS
    from .options import DEFAULT_VOCAB_SIZE, TRAIN_GROUPS, InstructOptions, LoRAOptions, PreferenceOptions, TrainConfig

    p.add_argument(
        "--config",
        metavar="FILE",
        help="read options from a YAML or JSON file with the flags' names "
        "(e.g. `lr: 3e-4`); flags given here win; a run's run_config.json works too",
    )
    groups = {title: p.add_argument_group(title) for title in TRAIN_GROUPS}
    g = groups["data"]
    g.add_argument("inputs", nargs="*", help="text files, folders, globs, .csv/.tsv, .jsonl, .json or .parquet")
    g.add_argument("--train-file", help="a training file (same as a positional input)")
    g.add_argument("--eval-file", help="validation file (default: a seeded 90/10 split of the inputs)")
    g.add_argument("--data", help="a dataset folder written by `gptforge prepare`")
    g.add_argument("--line-by-line", action="store_true", help="each line is one short sample (tweets, titles, jokes)")
    g.add_argument("--tokenizer", help="use this tokenizer (folder or tokenizer.json) instead of training one")
    g.add_argument(
        "--vocab-size",
        type=int,
        help=f"vocabulary of the tokenizer trained for the run (default: {DEFAULT_VOCAB_SIZE})",
    )
    g.add_argument(
        "--tokenizer-kind", choices=("bpe", "char"), default="bpe", help="byte-level BPE or characters (default: bpe)"
    )
    read_flags(p, groups["reading and cleaning"])
    g = groups["model"]
    g.add_argument("--init", help="fine-tune this model folder, weights file or hub id (gpt2, gpt2-medium, ...)")
    g.add_argument("--size", choices=tuple(PRESETS), help="from scratch: a preset (default: chosen for the data)")
    for name in ("n_layer", "n_embd", "n_head", "n_positions"):
        g.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=int, help=f"from scratch: override the preset's {name}"
        )
    g.add_argument(
        "--dropout",
        type=float,
        help="from scratch: residual, embedding and attention dropout (default: the preset's; 0 for tiny/mini/small, "
        "0.1 for gpt2 sizes)",
    )
    g.add_argument(
        "--attn-dropout",
        type=float,
        help="from scratch: dropout on the attention probabilities alone (default: --dropout's "
        "value, else the preset's); 0 with --dropout keeps the cheaper residual and embedding dropout only",
    )
    g.add_argument(
        "--activation",
        dest="activation_function",
        choices=ACTIVATIONS,
        help="from scratch: the MLP's activation_function (default: the preset's)",
    )
    g.add_argument(
        "--tie-embeddings",
        dest="tie_word_embeddings",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="from scratch: the output head shares the token embedding's matrix (default: the preset's)",
    )
    groups["precision and speed"].add_argument(
        "--nproc", type=int, help="launch this many processes with torchrun (data parallel)"
    )
    add_dataclass_options(p, TrainConfig, groups)
    add_dataclass_options(p, LoRAOptions, groups)
    add_dataclass_options(p, InstructOptions, groups)
    add_dataclass_options(p, PreferenceOptions, groups)


__all__ = ["TRAIN_EXAMPLES", "add_dataclass_options", "add_train_arguments", "inputs_of", "read_flags", "read_options"]
