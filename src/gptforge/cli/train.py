"""The commands that train a language model: train, demo."""

from __future__ import annotations

import argparse
import os
import sys

from ..options.flags import add_dataclass_options, option_values
from .args import inputs_of, read_flags, read_options

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


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from ..runtime import launch_torchrun

        return launch_torchrun(args.nproc, sys.argv[1:])
    from ..config import model_overrides
    from ..options import InstructOptions, LoRAOptions, PreferenceOptions, TrainConfig
    from ..train.pipeline import run_training

    options = option_values(args, TrainConfig)
    extra = dict(
        lora=LoRAOptions(**option_values(args, LoRAOptions)),
        instruct=InstructOptions(**option_values(args, InstructOptions)),
        preference=PreferenceOptions(**option_values(args, PreferenceOptions)),
    )
    inputs = inputs_of(args, list(args.inputs) + ([args.train_file] if args.train_file else []))
    shape = ("n_layer", "n_embd", "n_head", "n_positions", "dropout", "attn_dropout", "activation_function")
    overrides = model_overrides(**{k: getattr(args, k) for k in (*shape, "tie_word_embeddings")})
    result = run_training(
        inputs or None,
        data=args.data,
        eval_inputs=[args.val_file] if args.val_file else None,
        init=args.init,
        size=args.size,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        tokenizer_kind=args.tokenizer_kind,
        line_by_line=args.line_by_line,
        model_overrides=overrides,
        read_options=read_options(args),
        record={k: v for k, v in vars(args).items() if k not in ("func", "parser", "argv", "command", "config")},
        **extra,
        **options,
    )
    if result.val_loss is not None and result.val_perplexity is not None:  # a preference run said its figures
        bpb = f", {result.val_bits_per_byte:.4f} bits/byte" if result.val_bits_per_byte is not None else ""
        print(f"validation: loss {result.val_loss:.4f}, perplexity {result.val_perplexity:.2f}{bpb}")
    return 130 if result.interrupted else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import demo

    result = demo(
        args.inputs or None,
        out_dir=args.out,
        minutes=args.minutes,
        prompt=args.prompt,
        overwrite=args.overwrite,
        resume=args.resume,
        device=args.device,
    )
    return 130 if result.interrupted else 0


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """`gptforge train`'s options, in groups (options.TRAIN_GROUPS), the reading group shared with prepare."""
    from ..config import ACTIVATIONS, PRESETS
    from ..options import DEFAULT_VOCAB_SIZE, TRAIN_GROUPS, InstructOptions, LoRAOptions, PreferenceOptions, TrainConfig

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
    g.add_argument("--val-file", help="validation file (default: a seeded 90/10 split of the inputs)")
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


def add_train_commands(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a GPT-2 from scratch or fine-tune one",
        epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train from raw text (a tokenizer is trained and the data prepared on the way),\n"
        "from a prepared dataset (--data), or fine-tune a pretrained model (--init).",
    )
    add_train_arguments(p)
    p.set_defaults(func=cmd_train, parser=p)

    p = sub.add_parser("demo", help="the whole journey on a built-in corpus (the Python standard library's source)")
    p.add_argument("inputs", nargs="*", help="your own text files or folders instead of the built-in corpus")
    p.add_argument("--out", default="demo-model", help="model folder to write (default: demo-model)")
    p.add_argument("--minutes", type=float, default=3.0, help="training time (default: 3)")
    p.add_argument("--prompt", default="def ", help="prompt for the sample at the end")
    p.add_argument("--device", default="auto", help="auto (cuda, else mps on a Mac, else cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo run in --out")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo run in --out")
    p.set_defaults(func=cmd_demo, parser=p)
