"""The `gptforge` command. Thin: it parses arguments and calls the modules."""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


# --- info -------------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import model_info
    from .config import PRESETS, preset

    if args.model in PRESETS and not os.path.exists(args.model):
        config = preset(args.model)
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
    from .checkpoint import atomic_dir, save_model
    from .config import preset
    from .model import GPT
    import torch

    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)) and not args.force:
        raise ValueError(f"{args.out} already exists and is not empty; choose another --out, or add --force to replace it")
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

TRAIN_HELP = {
    "out_dir": "run folder: checkpoints, metrics, samples and the final model folder",
    "max_steps": "optimizer steps to take",
    "epochs": "passes over the training tokens (may be fractional)",
    "max_time": "wall-clock budget, e.g. 90s, 10m, 1.5h; the schedule ends fully decayed at the deadline",
    "batch_size": "sequences per micro-step (per process)",
    "grad_accum": "micro-steps accumulated per optimizer step",
    "block_size": "tokens per sequence (default: the model's context length)",
    "batch_mode": "random windows, or sequential passes over the data",
    "stride": "sequential mode: tokens between window starts (default: block size; half a block overlaps)",
    "learning_rate": "peak learning rate (default 1e-3 from scratch, 5e-5 fine-tuning)",
    "min_lr_ratio": "the schedule decays to learning_rate x this",
    "schedule": "cosine, linear or constant after warmup",
    "warmup_steps": "linear warmup steps (default 100 from scratch, 50 fine-tuning)",
    "weight_decay": "AdamW weight decay on matrices and embeddings (default 0.1 from scratch, 0.01 fine-tuning)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2 (default 0.95 from scratch, 0.999 fine-tuning)",
    "grad_clip": "clip the gradient norm to this (0 turns clipping off)",
    "device": "auto, cpu, cuda, cuda:1, ...",
    "precision": "auto (fp32 on CPU, bf16 on CUDA), fp32, bf16 or fp16 (with a gradient scaler)",
    "compile": "torch.compile the model",
    "gradient_checkpointing": "recompute activations in the backward pass to save memory",
    "log_interval": "steps between log lines (the only host syncs of the step loop)",
    "eval_interval": "steps between validation evaluations",
    "eval_tokens": "validation tokens per periodic evaluation (the final one uses all)",
    "sample_interval": "steps between text samples (default: eval interval)",
    "sample_prompt": "prompt for the samples (default: start of a document)",
    "sample_tokens": "tokens per sample",
    "early_stopping": "stop after this many evaluations without a better validation loss",
    "tensorboard": "also log to TensorBoard (needs tensorboard installed)",
    "plot": "draw loss.png at each evaluation",
    "progress": "show a progress bar",
    "save_steps": "steps between checkpoints",
    "save_minutes": "minutes between checkpoints",
    "keep_checkpoints": "how many recent checkpoints to keep",
    "resume": "continue the run in --out from its latest checkpoint",
    "overwrite": "replace a previous run in --out",
    "freeze": "transfer learning: embeddings, blocks:N (first N blocks), all-but:N, comma-joined",
    "seed": "random seed (weights, batches, dropout)",
    "fsdp": "shard parameters, gradients and optimizer state across the torchrun processes (big models)",
}


def _add_dataclass_options(parser: argparse.ArgumentParser, cls, helps: dict[str, str], rename: dict[str, str]) -> None:
    """One --option per dataclass field, so the CLI and the Python API share their defaults."""
    import dataclasses

    for f in dataclasses.fields(cls):
        flag = "--" + rename.get(f.name, f.name).replace("_", "-")
        help_text = helps.get(f.name, "")
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
        if f.name == "max_time":
            from .train import parse_duration

            kind = parse_duration
        default = f.default
        parser.add_argument(flag, dest=f.name, type=kind, default=default,
                            help=f"{help_text} (default: {default})" if default is not None else help_text)


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_torchrun(args.nproc)
    import dataclasses

    from .train import TrainConfig, run_training

    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
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

GENERATE_HELP = {
    "max_new_tokens": "tokens to generate per sample",
    "min_new_tokens": "suppress <|endoftext|> until this many tokens are generated",
    "do_sample": "sample (default) or decode greedily (--no-do-sample, same as --greedy or --temperature 0)",
    "temperature": "divide the logits by this before sampling; 0 means greedy",
    "top_k": "sample among the k most likely tokens (0: all)",
    "top_p": "sample among the most likely tokens whose probability reaches p (1: all)",
    "repetition_penalty": "> 1 discourages tokens already in the prompt or output (transformers' meaning)",
    "no_repeat_ngram_size": "never repeat an n-gram of this size (0: off)",
    "num_samples": "samples per prompt",
    "batch_size": "rows generated together (prompts of different lengths are left-padded)",
    "seed": "random seed; the same seed and options give the same text (default: a random seed, printed)",
}


def _gather_prompts(args: argparse.Namespace) -> list[str]:
    from .evaluate import read_text_file

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


def _output_path(folder: str, seed: int):
    import datetime
    from pathlib import Path

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = Path(folder) / f"gptforge-{stamp}-seed{seed}.txt", 1
    while path.exists():  # never overwrite an earlier file
        n += 1
        path = Path(folder) / f"gptforge-{stamp}-seed{seed}-{n}.txt"
    return path


def cmd_generate(args: argparse.Namespace) -> int:
    import dataclasses
    import random

    from .checkpoint import atomic_write
    from .generate import SamplingOptions, generate, load_model_and_tokenizer

    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingOptions)}
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
        path = _output_path(args.out_dir, options["seed"])
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda p: p.write_text(args.delimiter.join(texts) + "\n", encoding="utf-8"))
        print(f"wrote {len(texts)} sample(s) to {path}", file=sys.stderr)
    elif not live:
        print(args.delimiter.join(texts))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json
    import math
    from pathlib import Path

    import torch

    from .evaluate import EvalResult, evaluate_prepared, evaluate_text
    from .generate import load_model_and_tokenizer
    from .train import pick_precision

    model, tokenizer = None, None
    for f in args.files:
        if not Path(f).exists():
            raise FileNotFoundError(f"{f}: no such file or prepared dataset folder")
    if all((Path(f) / "meta.json").is_file() for f in args.files):
        from .checkpoint import load_model
        from .train import resolve_device

        model = load_model(args.model, device=resolve_device(args.device))  # token shards need no tokenizer
    else:
        model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, device=args.device, dtype=torch.float32)
    device = model.transformer.wte.weight.device
    precision = pick_precision(args.precision, device)
    kw = dict(block_size=args.block_size, stride=args.stride, batch_size=args.batch_size, max_tokens=args.max_tokens,
              autocast_dtype=None if precision == torch.float32 else precision)
    results = {}
    for f in args.files:
        if (Path(f) / "meta.json").is_file():
            results[f] = evaluate_prepared(model, f, split=args.split, **kw)
        else:
            results[f] = evaluate_text(model, tokenizer, [Path(f)], **kw)
    if len(results) > 1:
        nats = sum(r.loss * r.tokens for r in results.values())
        tokens = sum(r.tokens for r in results.values())
        bpb = None
        if all(r.bits_per_byte for r in results.values()):
            nbytes = sum(r.loss * r.tokens / math.log(2) / r.bits_per_byte for r in results.values())
            bpb = nats / math.log(2) / nbytes
        results["total"] = EvalResult(nats / tokens, math.exp(nats / tokens), bpb, tokens)
    if args.json:
        import dataclasses

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
        raise ValueError(f"{out}: already holds {', '.join(existing)}; pass --force to replace them or choose another --out")
    tok = train_tokenizer(args.files, vocab_size=args.vocab_size, min_frequency=args.min_frequency, kind=args.kind,
                          out_dir=out, **_read_options(args))
    print(f"trained a {tok.kind} tokenizer with {tok.vocab_size} tokens (eos id {tok.eos_id}, fingerprint {tok.fingerprint}) "
          f"into {out}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data import prepare

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
    from .train import TrainConfig

    _add_dataclass_options(p, TrainConfig, TRAIN_HELP, {"out_dir": "out", "learning_rate": "lr"})
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
    from .generate import SamplingOptions

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
    _add_dataclass_options(p, SamplingOptions, GENERATE_HELP, {})
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
    p.add_argument("--block-size", type=int, help="tokens per window (default: the model's context)")
    p.add_argument("--stride", type=int, help="tokens between windows (default: block size, no overlap); "
                                              "smaller gives each token more context")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    p.add_argument("--max-tokens", type=int, help="score only the first tokens of each input")
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
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .train import TrainingError

    try:
        return args.func(args)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError, TrainingError) as e:
        print(f"gptforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
