"""The `gptforge` command. Thin: it parses arguments and calls the modules."""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .errors import GPTForgeError, NotFoundError, RunFolderError


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


# --- info -------------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import model_info
    from .config import is_preset, resolve_config

    if is_preset(args.model):
        config = resolve_config(args.model)
        info = {"path": f"preset {args.model!r} (not saved)", "config": config, "params": config.num_params(),
                "non_embedding_params": config.num_params(non_embedding=True), "files": {}}
    else:
        info = model_info(args.model)
    c = info["config"]
    print(f"model: {info['path']}")
    print(f"parameters: {info['params']:,} ({_human(info['params'])}); non-embedding {info['non_embedding_params']:,}")
    print(f"vocab_size={c.vocab_size} n_positions={c.n_positions} n_embd={c.n_embd} n_layer={c.n_layer} "
          f"n_head={c.n_head} n_inner={c.mlp_width} activation={c.activation_function}")
    print(f"dropout: resid={c.resid_pdrop} embd={c.embd_pdrop} attn={c.attn_pdrop}; "
          f"bos={c.bos_token_id} eos={c.eos_token_id}")
    for name, size in info["files"].items():
        print(f"  {name:32s} {size:>14,} bytes")
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import save_model
    from .config import preset
    from .fsio import atomic_dir
    from .model import GPT

    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)) and not args.force:
        raise RunFolderError(f"{args.out} already exists and is not empty; choose another --out, or add --force to replace it")
    overrides = {k: getattr(args, k) for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
                 if getattr(args, k) is not None}
    config = preset(args.preset, **overrides)  # validated before anything is allocated or written
    torch.manual_seed(args.seed)
    model = GPT(config)
    with atomic_dir(args.out) as tmp:  # a crash leaves no half-written folder that looks complete
        save_model(model, tmp)
    print(f"wrote a randomly initialised {args.preset!r} model ({_human(model.num_params())} parameters) to {args.out}")
    return 0


# --- train ------------------------------------------------------------------------------------------

def _add_dataclass_options(parser: argparse.ArgumentParser, cls) -> None:
    """One --option per field of an options dataclass (help, choices and flag name from the field), so the
    CLI and the Python API share their names and defaults."""
    import dataclasses

    from .options import parse_duration

    for f in dataclasses.fields(cls):
        meta = f.metadata
        flag = "--" + (meta.get("flag") or f.name).replace("_", "-")
        help_text = meta.get("help", "")
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
        if f.name == "max_time":
            kind = parse_duration
        parser.add_argument(flag, dest=f.name, type=kind, default=f.default, choices=meta.get("choices"), help=help_text)


def _fields(args: argparse.Namespace, cls) -> dict:
    import dataclasses

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_torchrun(args.nproc)
    from .options import TrainConfig
    from .train.pipeline import run_training

    options = _fields(args, TrainConfig)
    inputs = list(args.inputs) + ([args.train_file] if args.train_file else [])
    overrides = {k: getattr(args, k) for k in ("n_layer", "n_embd", "n_head", "n_positions", "dropout") if getattr(args, k) is not None}
    if "dropout" in overrides:
        p = overrides.pop("dropout")
        overrides.update(resid_pdrop=p, embd_pdrop=p, attn_pdrop=p)
    result = run_training(
        inputs or None, data=args.data, eval_inputs=[args.eval_file] if args.eval_file else None, init=args.init,
        size=args.size, tokenizer=args.tokenizer, vocab_size=args.vocab_size, tokenizer_kind=args.tokenizer_kind,
        line_by_line=args.line_by_line, model_overrides=overrides, **options,
    )
    if result.val_loss is not None:
        bpb = f", {result.val_bits_per_byte:.4f} bits/byte" if result.val_bits_per_byte is not None else ""
        print(f"validation: loss {result.val_loss:.4f}, perplexity {result.val_perplexity:.2f}{bpb}")
    return 130 if result.interrupted else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import demo

    result = demo(args.inputs or None, out_dir=args.out, minutes=args.minutes, prompt=args.prompt,
                  overwrite=args.overwrite, device=args.device)
    return 130 if result.interrupted else 0


def _launch_torchrun(nproc: int) -> int:
    """`gptforge train --nproc N ...` is `torchrun --nproc_per_node N -m gptforge train ...`."""
    import subprocess

    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "gptforge", *argv]
    print("launching:", " ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd)


# --- generate / eval ------------------------------------------------------------------------------------

def _gather_prompts(args: argparse.Namespace) -> list[str]:
    from .data.reading import read_text_file

    sources = []
    for p in args.prompt + args.prompt_option:
        sources.append(sys.stdin.read() if p == "-" else p)
    for f in args.prompt_file or []:
        sources.append(read_text_file(f))
    if not sources and not sys.stdin.isatty() and not args.interactive:
        sources.append(sys.stdin.read())
    if args.lines:
        return [line for s in sources for line in s.splitlines() if line.strip()]
    return sources or [""]


def cmd_generate(args: argparse.Namespace) -> int:
    import random

    from .checkpoint import load_model_and_tokenizer
    from .fsio import dated_path, write_text
    from .generate import generate
    from .options import SamplingOptions

    options = _fields(args, SamplingOptions)
    SamplingOptions(**options).validate()  # bad options fail before the model loads
    if options["seed"] is None:
        options["seed"] = random.randrange(2**31)
        print(f"seed {options['seed']} (pass --seed {options['seed']} to get this text again)", file=sys.stderr)
    prompts = [] if args.interactive else _gather_prompts(args)
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, device=args.device)
    common = dict(stop=args.stop, include_prompt=not args.no_prompt, context_keep=args.context_keep, **options)

    def run(batch: list[str], live: bool) -> list[str]:
        current = [None]

        def show(row: int, piece: str) -> None:
            if current[0] is not None and row != current[0]:
                sys.stdout.write(args.delimiter)
            current[0] = row
            sys.stdout.write(piece)
            sys.stdout.flush()

        texts = generate(model, tokenizer, batch, stream=show if live else None, **common)
        if live:
            sys.stdout.write("\n")
        return texts

    if args.interactive:
        while True:
            if sys.stdin.isatty():
                print("prompt> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line or line.strip() in ("exit", "quit"):
                return 0
            run([line.rstrip("\n")], live=True)
            if args.num_samples > 1:
                sys.stdout.write(args.delimiter)
    # Stream when rows come one at a time; a batch of rows is printed when it is done.
    live = not args.no_stream and not args.out_dir and (len(prompts) * args.num_samples == 1 or args.batch_size == 1)
    texts = run(prompts, live)
    if args.out_dir:
        path = dated_path(args.out_dir, options["seed"])
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, args.delimiter.join(texts) + "\n")
        print(f"wrote {len(texts)} sample(s) to {path}", file=sys.stderr)
    elif not live:
        print(args.delimiter.join(texts))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    from pathlib import Path

    import torch

    from .checkpoint import load_model, load_model_and_tokenizer
    from .evaluate import combine, evaluate_prepared, evaluate_text
    from .options import EvalOptions
    from .runtime import pick_precision, resolve_device

    opts = EvalOptions(**_fields(args, EvalOptions))
    for f in args.files:
        if not Path(f).exists():
            raise NotFoundError(f"{f}: no such file or prepared dataset folder")
    prepared = [(Path(f) / "meta.json").is_file() for f in args.files]
    if all(prepared):
        model, tokenizer = load_model(args.model, device=resolve_device(args.device)), None  # token shards need no tokenizer
    else:
        model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, device=args.device, dtype=torch.float32)
    precision = pick_precision(args.precision, model.transformer.wte.weight.device)
    kw = dict(autocast_dtype=None if precision == torch.float32 else precision)
    results = {}
    for f, is_prepared in zip(args.files, prepared):
        if is_prepared:
            results[f] = evaluate_prepared(model, f, split=args.split, options=opts, **kw)
        else:
            results[f] = evaluate_text(model, tokenizer, [Path(f)], opts, **kw)
    if len(results) > 1:
        results["total"] = combine(list(results.values()))
    if args.json:
        print(json.dumps({k: dataclasses.asdict(r) for k, r in results.items()}, indent=2))
    else:
        width = max(map(len, results))
        for name, r in results.items():
            print(f"{name:{width}s}  {r}")
    return 0


# --- tokenizer / prepare -------------------------------------------------------------------------------


def _read_options(args: argparse.Namespace) -> dict:
    """ReadOptions keywords from the shared reading/cleaning flags."""
    column = args.column
    if column is not None and column.isdigit():
        column = int(column)
    opts = dict(column=column, header=not args.no_header, field=args.field, encoding_errors=args.encoding_errors,
                nfc=args.nfc, drop_control=args.drop_control, remove=tuple(args.remove or ()), dedupe=args.dedupe)
    if args.ext:
        opts["extensions"] = tuple(e.strip() for e in args.ext.split(",") if e.strip())
    return opts


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .tokenizer import TOKENIZER_FILES, train_tokenizer

    out = Path(args.out)
    existing = [f for f in TOKENIZER_FILES if (out / f).exists()]
    if existing and not args.force:
        raise RunFolderError(f"{out}: already holds {', '.join(existing)}; pass --force to replace them or choose another --out")
    tok = train_tokenizer(args.files, vocab_size=args.vocab_size, min_frequency=args.min_frequency, kind=args.kind,
                          out_dir=out, **_read_options(args))
    print(f"trained a {tok.kind} tokenizer with {tok.vocab_size} tokens (eos id {tok.eos_id}, fingerprint {tok.fingerprint}) "
          f"into {out}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.shards import prepare

    meta = prepare(args.inputs, args.tokenizer, args.out, line_by_line=args.line_by_line, val_fraction=args.val_fraction,
                   val_inputs=args.val_file, seed=args.seed, workers=args.workers, shard_tokens=args.shard_tokens,
                   force=args.force, progress=not args.quiet, **_read_options(args))
    if meta["reused"]:
        print(f"{args.out}: up to date with the inputs and tokenizer; reused (pass --force to rebuild)")
    for split in ("train", "val"):
        m = meta[split]
        print(f"{split}: {m['tokens']:,} tokens, {m['documents']:,} documents, {m['bytes']:,} bytes, {len(m['shards'])} shard(s)")
    if meta["val_split"] == "tail":
        print("note: too few documents to split by document; val is the last "
              f"{meta['options']['val_fraction']:.0%} of the text (separate documents with blank lines, or pass --val-file)")
    if not meta["reused"]:
        mb = sum(f["bytes"] for f in meta["inputs"] + meta["val_inputs"]) / 1e6
        print(f"wrote {args.out} ({meta['dtype']}) in {meta['seconds']:.1f}s, {mb / max(meta['seconds'], 1e-9):.1f} MB/s")
    return 0


# --- parser -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptforge", description="Train GPT-2 language models on your own text.")
    parser.add_argument("--version", action="version", version=f"gptforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="show a model's config, parameter count and files")
    p.add_argument("model", help="model folder, weights file, preset name or hub id")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("create", help="write a randomly initialised model folder from a preset")
    p.add_argument("preset", help="preset name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny, mini, small)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace --out if it already holds files")
    for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None, help=f"override {name}")
    p.set_defaults(func=cmd_create)

    # Each stage adds its own commands below, in the order of the pipeline.
    # -- tokenizer / prepare (tokenizer.py, data.py) --
    def read_flags(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("reading and cleaning")
        g.add_argument("--column", help="CSV/TSV: text column, by header name or 0-based index")
        g.add_argument("--no-header", action="store_true", help="CSV/TSV: the first row is data, not column names")
        g.add_argument("--field", default="text", help="JSON Lines: field holding the text (default: text)")
        g.add_argument("--ext", help="file types taken from folders, comma-separated (default: .txt,.md,.text,.csv,.tsv,.jsonl,.ndjson)")
        g.add_argument("--encoding-errors", choices=("strict", "replace"), default="strict",
                       help="invalid UTF-8: stop with the file and byte offset (strict), or replace it with U+FFFD")
        g.add_argument("--nfc", action="store_true", help="Unicode NFC normalisation")
        g.add_argument("--drop-control", action="store_true", help="remove control characters (keeps tabs and newlines)")
        g.add_argument("--remove", action="append", metavar="REGEX", help="delete matches of this regex (repeatable), "
                       "e.g. --remove '^[ \\t]*\\d+[ \\t]*(\\n|$)' for page-number lines")
        g.add_argument("--dedupe", action="store_true", help="drop exact duplicate documents / lines")

    p = sub.add_parser("tokenizer", help="train a tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE or a character vocabulary on your text")
    t.add_argument("files", nargs="+", help="text files, folders, globs, .csv or .jsonl")
    t.add_argument("--out", required=True, help="folder to write the tokenizer files into")
    t.add_argument("--vocab-size", type=int, default=5000, help="number of tokens, <|endoftext|> included (default 5000)")
    t.add_argument("--min-frequency", type=int, default=2, help="ignore merges / characters seen fewer times (default 2)")
    t.add_argument("--kind", choices=("bpe", "char"), default="bpe",
                   help="bpe: GPT-2 byte-level BPE; char: one token per character (unseen characters become <|unk|>)")
    t.add_argument("--force", action="store_true", help="replace tokenizer files already in --out")
    read_flags(t)
    t.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("prepare", help="tokenize text into train/val token shards")
    p.add_argument("inputs", nargs="+", help="text files, folders (recursive), globs, .csv/.tsv or .jsonl")
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
    p.set_defaults(func=cmd_prepare)
    # -- train / demo (train.py) --
    p = sub.add_parser("train", help="train a GPT-2 from scratch or fine-tune one",
                       description="Train from raw text (a tokenizer is trained and the data prepared on the way), "
                                   "from a prepared dataset (--data), or fine-tune a pretrained model (--init).")
    p.add_argument("inputs", nargs="*", help="text files, folders, globs, .csv or .jsonl")
    p.add_argument("--train-file", help="a training file (same as a positional input)")
    p.add_argument("--eval-file", help="validation file (default: a seeded 90/10 split of the inputs)")
    p.add_argument("--data", help="a dataset folder written by `gptforge prepare`")
    p.add_argument("--init", help="fine-tune this model folder, weights file or hub id (gpt2, gpt2-medium, ...)")
    p.add_argument("--size", help="from scratch: preset (tiny, mini, small, gpt2, ...; default: chosen for the data)")
    for name in ("n_layer", "n_embd", "n_head", "n_positions"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, help=f"from scratch: override the preset's {name}")
    p.add_argument("--dropout", type=float, help="from scratch: residual, embedding and attention dropout (default: the preset's; 0 for tiny/mini/small, 0.1 for gpt2 sizes)")
    p.add_argument("--tokenizer", help="use this tokenizer (folder or tokenizer.json) instead of training one")
    p.add_argument("--vocab-size", type=int, help="vocabulary of the tokenizer trained for the run (default 5000)")
    p.add_argument("--tokenizer-kind", choices=("bpe", "char"), default="bpe", help="byte-level BPE or characters")
    p.add_argument("--line-by-line", action="store_true", help="each line is one short sample (tweets, titles, jokes)")
    p.add_argument("--nproc", type=int, help="launch this many processes with torchrun (data parallel)")
    from .options import EvalOptions, SamplingOptions, TrainConfig

    _add_dataclass_options(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="the whole journey on a built-in corpus (the Python standard library's source)")
    p.add_argument("inputs", nargs="*", help="your own text files or folders instead of the built-in corpus")
    p.add_argument("--out", default="demo-model", help="model folder to write (default: demo-model)")
    p.add_argument("--minutes", type=float, default=3.0, help="training time (default: 3)")
    p.add_argument("--prompt", default="def ", help="prompt for the sample at the end")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo run in --out")
    p.set_defaults(func=cmd_demo)
    # -- generate / eval (generate.py, evaluate.py) --
    p = sub.add_parser("generate", help="generate text from a model folder",
                       description="Sample text with transformers' generation options. Prompts come from arguments, "
                                   "--prompt-file, or stdin ('-' or a pipe); an empty prompt starts from <|endoftext|>.")
    p.add_argument("model", help="model folder (with its tokenizer) or hub id")
    p.add_argument("prompt", nargs="*", help="prompt text; several give several prompts; '-' reads stdin")
    p.add_argument("-p", "--prompt", dest="prompt_option", action="append", default=[],
                   help="a prompt, as an option (repeatable; may come after other options; '-' reads stdin)")
    p.add_argument("--prompt-file", action="append", help="a file whose text is one prompt (repeatable)")
    p.add_argument("--lines", action="store_true", help="every non-empty line of the prompts is a prompt of its own")
    p.add_argument("--interactive", action="store_true", help="read prompts line by line from stdin, stream each answer")
    _add_dataclass_options(p, SamplingOptions)
    p.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding (same as --no-do-sample)")
    p.add_argument("--stop", action="append", default=[], help="stop a sample at this string, not included (repeatable)")
    p.add_argument("--no-prompt", action="store_true", help="print only the generated text, not the prompt")
    p.add_argument("--context-keep", type=int, help="tokens kept when the text outgrows the context (default: 3/4 of it)")
    p.add_argument("--out-dir", help="write the samples to a file in this folder, named with the date and seed")
    p.add_argument("--delimiter", default="\n" + "=" * 40 + "\n", help="printed between samples")
    p.add_argument("--no-stream", action="store_true", help="print each sample when it is complete")
    p.add_argument("--tokenizer", help="tokenizer folder or tokenizer.json (default: the model folder's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="perplexity, loss and bits per byte of text files or prepared datasets",
                       description="Sliding-window evaluation: windows of --block-size tokens every --stride tokens, "
                                   "each scoring only tokens not scored before.")
    p.add_argument("model", help="model folder or hub id")
    p.add_argument("files", nargs="+", help="UTF-8 text files, or dataset folders written by `gptforge prepare`")
    _add_dataclass_options(p, EvalOptions)
    p.add_argument("--split", default="val", help="split of a prepared dataset (default: val)")
    p.add_argument("--tokenizer", help="tokenizer folder or tokenizer.json (default: the model folder's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast dtype (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except GPTForgeError as e:  # a problem with the user's input: one line; anything else is a bug with its traceback
        print(f"gptforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
