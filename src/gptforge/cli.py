"""The `gptforge` command. Thin: it parses arguments and calls the modules."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .aliases import translate_argv, unknown_flag
from .cli_args import (
    TRAIN_EXAMPLES,
    add_train_arguments,
    inputs_of,
    option_values,
    read_flags,
    read_options,
)
from .errors import GPTForgeError, OptionError, RunFolderError
from .faults import describe_fault, leave, stop_on_sigterm
from .options import DEFAULT_VOCAB_SIZE


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


# --- info -------------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    if args.model is None or args.calibrate:
        return _machine_info(args.calibrate)
    from .checkpoint import model_info
    from .config import is_preset, resolve_config

    if is_preset(args.model):
        config = resolve_config(args.model)
        info = {
            "path": f"preset {args.model!r} (not saved)",
            "config": config,
            "params": config.num_params(),
            "non_embedding_params": config.num_params(non_embedding=True),
            "files": {},
        }
    else:
        info = model_info(args.model)
    c = info["config"]
    print(f"model: {info['path']}")
    print(f"parameters: {info['params']:,} ({_human(info['params'])}); non-embedding {info['non_embedding_params']:,}")
    print(
        f"vocab_size={c.vocab_size} n_positions={c.n_positions} n_embd={c.n_embd} n_layer={c.n_layer} "
        f"n_head={c.n_head} n_inner={c.mlp_width} activation={c.activation_function}"
    )
    print(
        f"dropout: resid={c.resid_pdrop} embd={c.embd_pdrop} attn={c.attn_pdrop}; "
        f"bos={c.bos_token_id} eos={c.eos_token_id}"
    )
    for name, size in info["files"].items():
        print(f"  {name:32s} {size:>14,} bytes")
    return 0


def _machine_info(measure: bool) -> int:
    """This machine's CPU paths: processor, instruction-set level, decoding kernel, measured choices."""
    from . import calibrate, fastdecode, native

    calibrate.MEASURES.setdefault("steps", fastdecode.measure_steps)  # as importing fastdecode (and kernels) did
    if measure:
        print(f"measuring ({', '.join(sorted(calibrate.MEASURES))}) ...", flush=True)
        calibrate.measure_all()
    print("\n".join(native.describe() + calibrate.describe()))
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import save_model
    from .config import preset
    from .fsio import atomic_dir, check_out_folder
    from .model import GPT

    check_out_folder(args.out, args.force)
    overrides = {
        k: getattr(args, k)
        for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
        if getattr(args, k) is not None
    }
    config = preset(args.preset, **overrides)  # validated before anything is allocated or written
    torch.manual_seed(args.seed)
    model = GPT(config)
    with atomic_dir(args.out) as tmp:  # a crash leaves no half-written folder that looks complete
        save_model(model, tmp)
    print(f"wrote a randomly initialised {args.preset!r} model ({_human(model.num_params())} parameters) to {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_model

    out = export_model(args.run, args.out, license=args.license, force=args.force, format=args.format, type=args.type)
    what = "model files" if args.format == "transformers" else f"{args.format} {args.type or 'f32'}"
    print(f"exported the model of {args.run} to {out} ({what} and README.md; no data, checkpoints or trainer state)")
    print(f"upload it with the Hugging Face CLI: hf upload USER/NAME {out} .")
    return 0


# --- train ------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from .runtime import launch_torchrun

        return launch_torchrun(args.nproc, sys.argv[1:])
    from .options import InstructOptions, LoRAOptions, PreferenceOptions, TrainConfig
    from .train.pipeline import run_training

    options = option_values(args, TrainConfig)
    extra = dict(
        lora=LoRAOptions(**option_values(args, LoRAOptions)),
        instruct=InstructOptions(**option_values(args, InstructOptions)),
        preference=PreferenceOptions(**option_values(args, PreferenceOptions)),
    )
    inputs = inputs_of(args, list(args.inputs) + ([args.train_file] if args.train_file else []))
    overrides = {
        k: getattr(args, k)
        for k in (
            "n_layer",
            "n_embd",
            "n_head",
            "n_positions",
            "dropout",
            "attn_dropout",
            "activation_function",
            "tie_word_embeddings",
        )
        if getattr(args, k) is not None
    }
    for flag, p in (("--dropout", args.dropout), ("--attn-dropout", args.attn_dropout)):
        if p is not None and not 0 <= p < 1:
            raise OptionError(f"{flag} {p}: must be at least 0 and below 1 (1 would drop everything)")
    if "dropout" in overrides:
        p = overrides.pop("dropout")
        overrides.update(resid_pdrop=p, embd_pdrop=p, attn_pdrop=p)
    if "attn_dropout" in overrides:
        overrides["attn_pdrop"] = overrides.pop("attn_dropout")
    result = run_training(
        inputs or None,
        data=args.data,
        eval_inputs=[args.eval_file] if args.eval_file else None,
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
    from .demo import demo

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


# --- tokenizer / prepare -------------------------------------------------------------------------------


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .tokenizer import TOKENIZER_FILES, train_tokenizer

    out = Path(args.out)
    existing = [f for f in TOKENIZER_FILES if (out / f).exists()]
    if existing and not args.force:
        raise RunFolderError(
            f"{out}: already holds {', '.join(existing)}; pass --force to replace them or choose another --out"
        )
    tok = train_tokenizer(
        inputs_of(args, args.files),
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        kind=args.kind,
        out_dir=out,
        progress=True,
        **read_options(args),
    )
    print(
        f"trained a {tok.kind} tokenizer with {tok.vocab_size} tokens (eos id {tok.eos_id}, "
        f"fingerprint {tok.fingerprint}) into {out}"
    )
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.shards import prepare

    meta = prepare(
        inputs_of(args, args.inputs),
        args.tokenizer,
        args.out,
        line_by_line=args.line_by_line,
        val_fraction=args.val_fraction,
        val_inputs=args.val_file,
        seed=args.seed,
        workers=args.workers,
        shard_tokens=args.shard_tokens,
        force=args.force,
        progress=not args.quiet,
        **read_options(args),
    )
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


# --- parser -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptforge", description="Train GPT-2 language models on your own text.")
    parser.add_argument("--version", action="version", version=f"gptforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Each stage adds its own commands, in the order of the pipeline.
    from .cli_classify import add_classify_commands
    from .cli_generate import add_generate_commands
    from .cli_reward import add_reward_commands

    for add in (
        _add_model_commands,
        _add_data_commands,
        _add_train_commands,
        add_classify_commands,
        add_reward_commands,
        add_generate_commands,
        _add_serve_command,
    ):
        add(sub)
    return parser


def _add_model_commands(sub) -> None:
    p = sub.add_parser(
        "info",
        help="show a model's config, parameter count and files; without one, this machine's "
        "CPU paths (processor, instruction set, decoding kernel, measured choices)",
    )
    p.add_argument("model", nargs="?", default=None, help="model folder, weights file, preset name or hub id")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="measure again which CPU paths are fastest here, store and show them (docs/performance.md)",
    )
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("create", help="write a randomly initialised model folder from a preset")
    p.add_argument("preset", help="preset name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny, mini, small)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace --out if it already holds files")
    for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None, help=f"override {name}")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser(
        "export",
        help="copy a run's model, without its data and checkpoints, with a model card",
        description="Write the model files of a run (config, weights, generation config, tokenizer) and "
        "a README.md model card into a new folder, ready for `hf upload`. The run's data/, "
        "checkpoints/ and trainer state are left out: they hold the training text.",
    )
    p.add_argument("run", help="run folder (or RUN/best, RUN/checkpoints/step-N)")
    p.add_argument("out", help="folder to write")
    p.add_argument(
        "--license", default="other", help="license in the model card (e.g. mit, apache-2.0, cc-by-4.0; default: other)"
    )
    p.add_argument("--force", action="store_true", help="replace the folder if it already holds files")
    p.add_argument(
        "--format",
        choices=("transformers", "gguf", "onnx", "ct2"),
        default="transformers",
        help="transformers: the model folder (default); gguf: one file for llama.cpp (pip install "
        "'gptforge[gguf]'); onnx: the decoder with its cache for ONNX Runtime ('gptforge[onnx]'); ct2: "
        "CTranslate2's converter on the folder ('gptforge[ct2]')",
    )
    p.add_argument(
        "--type",
        choices=("f32", "f16", "q8_0", "int8"),
        default=None,
        help="weights: gguf f32 (default), f16 or q8_0; onnx and ct2 f32 (default) or int8",
    )
    p.set_defaults(func=cmd_export)


def _add_data_commands(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE or a character vocabulary on your text")
    t.add_argument("files", nargs="*", help="text files, folders, globs, .csv/.tsv, .jsonl, .json or .parquet")
    t.add_argument("--out", required=True, help="folder to write the tokenizer files into")
    t.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        help=f"number of tokens, <|endoftext|> included (default {DEFAULT_VOCAB_SIZE})",
    )
    t.add_argument(
        "--min-frequency", type=int, default=2, help="ignore merges / characters seen fewer times (default 2)"
    )
    t.add_argument(
        "--kind",
        choices=("bpe", "char"),
        default="bpe",
        help="bpe: GPT-2 byte-level BPE; char: one token per character (unseen characters become <|unk|>)",
    )
    t.add_argument("--force", action="store_true", help="replace tokenizer files already in --out")
    read_flags(t)
    t.set_defaults(func=cmd_tokenizer_train, parser=t)

    p = sub.add_parser("prepare", help="tokenize text into train/val token shards")
    p.add_argument(
        "inputs", nargs="*", help="text files, folders (recursive), globs, .csv/.tsv, .jsonl, .json or .parquet"
    )
    p.add_argument("--tokenizer", required=True, help="tokenizer folder, tokenizer.json, vocab.json or model folder")
    p.add_argument("--out", required=True, help="dataset folder to write (train_*.bin, val_*.bin, meta.json)")
    p.add_argument("--line-by-line", action="store_true", help="each line / row is one sample wrapped in <|endoftext|>")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of documents for validation (default 0.1)")
    p.add_argument("--val-file", action="append", help="validation text instead of a split (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: CPU cores)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    p.add_argument("--force", action="store_true", help="rebuild even when the shards are up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    read_flags(p)
    p.set_defaults(func=cmd_prepare, parser=p)


def _add_train_commands(sub) -> None:
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


def _add_serve_command(sub) -> None:
    from .serve import add_serve_arguments, run_from_args

    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP: an OpenAI-compatible API and a web playground",
        description="An OpenAI-compatible API (/v1/completions, /v1/chat/completions, streaming) with "
        "continuous batching, and a playground page at /. Needs `pip install 'gptforge[serve]'`.",
    )
    add_serve_arguments(p)
    p.set_defaults(func=run_from_args)


def _take_late_positionals(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> None:
    """`generate MODEL --chat "question"`: argparse fills a command's variadic positional (prompts, files) before
    the options and calls what follows them unrecognized; such words join it, anything else is an error."""
    own = getattr(args, "parser", None)
    variadic = [a for a in (own._actions if own else []) if not a.option_strings and a.nargs in ("*", "+")]
    cut = extra.index("--") if "--" in extra else len(extra)  # after `--` a word may start with "-"
    flag = next((w for w in extra[:cut] if w.startswith("-") and w != "-"), None)
    if flag is not None:  # one line: what to use instead, or the closest flag (not the whole usage)
        raise unknown_flag(own or parser, flag)
    if len(variadic) != 1:
        raise OptionError(f"unrecognized arguments: {' '.join(extra)} (see --help)")
    dest = variadic[0].dest
    setattr(args, dest, [*(getattr(args, dest) or []), *extra[:cut], *extra[cut + 1 :]])


def _command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.ArgumentParser, int]:
    """The parser of the (sub-)command `argv` names, and where its own arguments start."""
    p, i = parser, 0
    while True:
        subs = next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)
        if subs is None or i >= len(argv) or argv[i] not in subs.choices:
            return p, i
        p, i = subs.choices[argv[i]], i + 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    own, start = _command_parser(parser, argv)
    if start:  # other tools' spellings (--output_dir, --num_train_epochs, --k) as gptforge's flags
        argv = argv[:start] + translate_argv(own, argv[start:])
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    args.argv = argv[argv.index(args.command) + 1 :]  # the command's own arguments
    stop_on_sigterm()
    try:
        if extra:
            _take_late_positionals(parser, args, extra)
        if getattr(args, "config", None):
            from .configfile import apply_config_file

            apply_config_file(args, args.parser, args.argv, args.config)
        return args.func(args)
    except GPTForgeError as e:  # a problem with the user's input: one line; anything else is a bug with its traceback
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process meets the same bad input: say it once
            print(f"gptforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return leave(130)
    except BrokenPipeError:  # `gptforge info MODEL | head -3`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error as Python flushes at exit
        return 141
    except (OSError, RuntimeError, MemoryError) as e:  # permission denied, disk full, out of memory: one line too
        if describe_fault(e) is None:
            raise
        print(f"gptforge {args.command}: error: {describe_fault(e)}", file=sys.stderr)
        return 2
