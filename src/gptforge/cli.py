"""The `gptforge` command. Thin: it parses arguments and calls the modules."""
from __future__ import annotations

import argparse
import os
import signal
import sys

from . import __version__
from .cli_args import TRAIN_EXAMPLES, add_train_arguments, read_flags
from .cli_args import add_dataclass_options as _add_dataclass_options
from .cli_args import inputs_of as _inputs
from .cli_args import read_options as _read_options
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


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_model

    out = export_model(args.run, args.out, license=args.license, force=args.force)
    print(f"exported the model of {args.run} to {out} (model files and README.md; no data, checkpoints or trainer state)")
    print(f"upload it with the Hugging Face CLI: hf upload USER/NAME {out} .")
    return 0


# --- train ------------------------------------------------------------------------------------------

def _fields(args: argparse.Namespace, cls) -> dict:
    import dataclasses

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_torchrun(args.nproc)
    from .options import InstructOptions, LoRAOptions, TrainConfig
    from .train.pipeline import run_training

    options = _fields(args, TrainConfig)
    extra = dict(lora=LoRAOptions(**_fields(args, LoRAOptions)), instruct=InstructOptions(**_fields(args, InstructOptions)))
    inputs = _inputs(args, list(args.inputs) + ([args.train_file] if args.train_file else []))
    overrides = {k: getattr(args, k) for k in ("n_layer", "n_embd", "n_head", "n_positions", "dropout") if getattr(args, k) is not None}
    if "dropout" in overrides:
        p = overrides.pop("dropout")
        overrides.update(resid_pdrop=p, embd_pdrop=p, attn_pdrop=p)
    result = run_training(
        inputs or None, data=args.data, eval_inputs=[args.eval_file] if args.eval_file else None, init=args.init,
        size=args.size, tokenizer=args.tokenizer, vocab_size=args.vocab_size, tokenizer_kind=args.tokenizer_kind,
        line_by_line=args.line_by_line, model_overrides=overrides, read_options=_read_options(args),
        record={k: v for k, v in vars(args).items() if k not in ("func", "parser", "argv", "command", "config")}, **extra, **options,
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

    from .adapters import load_with_adapter
    from .chat import Conversation
    from .checkpoint import sampling_defaults
    from .configfile import given_on_command_line
    from .fsio import dated_path, write_text
    from .generate import generate
    from .options import SamplingOptions

    from .quantize import check_method

    options = _fields(args, SamplingOptions)
    SamplingOptions(**options).validate()  # bad options fail before the model loads
    check_method(args.quantize)
    if options["seed"] is None:
        options["seed"] = random.randrange(2**31)
        print(f"seed {options['seed']} (pass --seed {options['seed']} to get this text again)", file=sys.stderr)
    prompts = [] if args.interactive else _gather_prompts(args)
    model, tokenizer = load_with_adapter(args.model, args.adapter, args.tokenizer, device=args.device, quantize=args.quantize)
    chat = Conversation(tokenizer, keep_history=args.interactive) if args.chat else None
    prompts = [chat.ask(p) for p in prompts] if chat else prompts
    given = given_on_command_line(args.parser, args.argv)  # the folder's generation_config.json sets the defaults
    options.update({k: v for k, v in sampling_defaults(model).items() if k not in given})
    SamplingOptions(**options).validate()
    common = dict(stop=args.stop, include_prompt=not (args.no_prompt or chat), context_keep=args.context_keep, **options)

    def run(batch: list[str], live: bool) -> list[str]:
        current = [None]

        def show(row: int, piece: str) -> None:
            if current[0] is not None and row != current[0]:
                sys.stdout.write(args.delimiter)
            current[0] = row
            sys.stdout.write(piece)
            sys.stdout.flush()

        texts = generate(model, tokenizer, batch, stream=show if live else None,
                         progress=not live and len(batch) * options["num_samples"] > 1, **common)
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
            reply = run([chat.ask(line.rstrip("\n")) if chat else line.rstrip("\n")], live=True)
            if chat:
                chat.answer(reply[0])
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


ADAPTER_HELP = "a LoRA adapter folder (gptforge's or peft's) to apply to the model, merged on load; see docs/adapters.md"
QUANTIZE_HELP = "int8: int8 weights made on load (faster on CPUs, slightly different numbers); see docs/guide.md"


def cmd_quantize(args: argparse.Namespace) -> int:
    from .quantize import quantize_folder

    out = quantize_folder(args.model, args.out, args.method, force=args.force)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote the int8 model folder {out} ({size / 1e6:.1f} MB)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .adapters import merge_to_folder

    out = merge_to_folder(args.base, args.adapter, args.out, force=args.force)
    print(f"wrote {out}: {args.base} with the adapter {args.adapter} merged in (a plain model folder, no adapter code needed)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    from pathlib import Path

    import torch

    from .adapters import is_adapter, load_with_adapter
    from .checkpoint import load_model
    from .evaluate import combine, evaluate_prepared, evaluate_text
    from .options import EvalOptions
    from .runtime import pick_precision, resolve_device

    from .quantize import check_method

    opts = EvalOptions(**_fields(args, EvalOptions))
    check_method(args.quantize)
    for f in args.files:
        if not Path(f).exists():
            raise NotFoundError(f"{f}: no such file or prepared dataset folder")
    prepared = [(Path(f) / "meta.json").is_file() for f in args.files]
    if all(prepared) and not (args.adapter or is_adapter(args.model)):
        model = load_model(args.model, device=resolve_device(args.device), quantize=args.quantize)
        tokenizer = None  # token shards need no tokenizer
    else:
        model, tokenizer = load_with_adapter(args.model, args.adapter, args.tokenizer, device=args.device, dtype=torch.float32,
                                             quantize=args.quantize)
    precision = pick_precision(args.precision, model.transformer.wte.weight.device)
    kw = dict(autocast_dtype=None if precision == torch.float32 else precision, progress=True)
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


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .tokenizer import TOKENIZER_FILES, train_tokenizer

    out = Path(args.out)
    existing = [f for f in TOKENIZER_FILES if (out / f).exists()]
    if existing and not args.force:
        raise RunFolderError(f"{out}: already holds {', '.join(existing)}; pass --force to replace them or choose another --out")
    tok = train_tokenizer(_inputs(args, args.files), vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                          kind=args.kind, out_dir=out, progress=True, **_read_options(args))
    print(f"trained a {tok.kind} tokenizer with {tok.vocab_size} tokens (eos id {tok.eos_id}, fingerprint {tok.fingerprint}) "
          f"into {out}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.shards import prepare

    meta = prepare(_inputs(args, args.inputs), args.tokenizer, args.out, line_by_line=args.line_by_line, val_fraction=args.val_fraction,
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
    # Each stage adds its own commands, in the order of the pipeline.
    from .cli_classify import add_classify_commands

    for add in (_add_model_commands, _add_data_commands, _add_train_commands, add_classify_commands, _add_generate_commands,
                _add_serve_command):
        add(sub)
    return parser


def _add_model_commands(sub) -> None:
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

    p = sub.add_parser("export", help="copy a run's model, without its data and checkpoints, with a model card",
                       description="Write the model files of a run (config, weights, generation config, tokenizer) and "
                                   "a README.md model card into a new folder, ready for `hf upload`. The run's data/, "
                                   "checkpoints/ and trainer state are left out: they hold the training text.")
    p.add_argument("run", help="run folder (or RUN/best, RUN/checkpoints/step-N)")
    p.add_argument("out", help="folder to write")
    p.add_argument("--license", default="other", help="license in the model card (e.g. mit, apache-2.0, cc-by-4.0; default: other)")
    p.add_argument("--force", action="store_true", help="replace the folder if it already holds files")
    p.set_defaults(func=cmd_export)


def _add_data_commands(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE or a character vocabulary on your text")
    t.add_argument("files", nargs="*", help="text files, folders, globs, .csv/.tsv, .jsonl, .json or .parquet")
    t.add_argument("--out", required=True, help="folder to write the tokenizer files into")
    t.add_argument("--vocab-size", type=int, default=5000, help="number of tokens, <|endoftext|> included (default 5000)")
    t.add_argument("--min-frequency", type=int, default=2, help="ignore merges / characters seen fewer times (default 2)")
    t.add_argument("--kind", choices=("bpe", "char"), default="bpe",
                   help="bpe: GPT-2 byte-level BPE; char: one token per character (unseen characters become <|unk|>)")
    t.add_argument("--force", action="store_true", help="replace tokenizer files already in --out")
    read_flags(t)
    t.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("prepare", help="tokenize text into train/val token shards")
    p.add_argument("inputs", nargs="*", help="text files, folders (recursive), globs, .csv/.tsv, .jsonl, .json or .parquet")
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


def _add_train_commands(sub) -> None:
    p = sub.add_parser("train", help="train a GPT-2 from scratch or fine-tune one", epilog=TRAIN_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train from raw text (a tokenizer is trained and the data prepared on the way),\n"
                                   "from a prepared dataset (--data), or fine-tune a pretrained model (--init).")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train, parser=p)

    p = sub.add_parser("demo", help="the whole journey on a built-in corpus (the Python standard library's source)")
    p.add_argument("inputs", nargs="*", help="your own text files or folders instead of the built-in corpus")
    p.add_argument("--out", default="demo-model", help="model folder to write (default: demo-model)")
    p.add_argument("--minutes", type=float, default=3.0, help="training time (default: 3)")
    p.add_argument("--prompt", default="def ", help="prompt for the sample at the end")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo run in --out")
    p.set_defaults(func=cmd_demo)


def _add_generate_commands(sub) -> None:
    from .options import EvalOptions, SamplingOptions

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
    p.add_argument("--quantize", metavar="int8", help=QUANTIZE_HELP)
    p.add_argument("--adapter", metavar="DIR", help=ADAPTER_HELP)
    p.add_argument("--chat", action="store_true", help="each prompt is a user message put through the model's chat template "
                   "(gptforge's GPT-2 template if it has none); only the answer is printed; --interactive keeps the conversation")
    p.set_defaults(func=cmd_generate, parser=p)

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
    p.add_argument("--quantize", metavar="int8", help=QUANTIZE_HELP)
    p.add_argument("--adapter", metavar="DIR", help=ADAPTER_HELP)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model: a plain model folder",
                       description="Fold the adapter's low-rank updates into the base model's weights and write a model "
                                   "folder that gptforge and transformers open without any adapter code.")
    p.add_argument("base", help="the base model folder or hub id the adapter was trained on")
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors, from gptforge or peft)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--force", action="store_true", help="replace --out if it already holds files")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("quantize", help="write an int8 copy of a model folder, for faster generation on CPUs",
                       description="Store the linear layers and the output head with int8 weights (one scale per "
                                   "output channel). The folder opens in gptforge (generate, eval, serve, GPTForge) "
                                   "but not in transformers: keep the fp32 folder to share.")
    p.add_argument("model", help="fp32 model folder or hub id")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--method", default="int8", help="quantization (default and only choice: int8)")
    p.add_argument("--force", action="store_true", help="replace --out if it already holds files")
    p.set_defaults(func=cmd_quantize)


def _add_serve_command(sub) -> None:
    from .serve import add_serve_arguments, run_from_args

    p = sub.add_parser("serve", help="serve a model over HTTP: an OpenAI-compatible API and a web playground",
                       description="An OpenAI-compatible API (/v1/completions, /v1/chat/completions, streaming) with "
                                   "continuous batching, and a playground page at /. Needs `pip install 'gptforge[serve]'`.")
    add_serve_arguments(p)
    p.set_defaults(func=run_from_args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    args.argv = argv[argv.index(args.command) + 1:]  # the command's own arguments
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # `kill` stops every stage as Ctrl-C does, cleaning up
        signal.signal(signal.SIGTERM, _terminate)
    try:
        if getattr(args, "config", None):
            from .configfile import apply_config_file

            apply_config_file(args, args.parser, args.argv, args.config)
        return args.func(args)
    except GPTForgeError as e:  # a problem with the user's input: one line; anything else is a bug with its traceback
        print(f"gptforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a fault of the machine the user can fix: permissions, disk full, read-only
        from .fsio import describe_os_error

        if describe_os_error(e) is None:
            raise
        print(f"gptforge {args.command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as e:
        if "torch" not in sys.modules:  # no tensor was ever allocated
            raise
        from .runtime import out_of_memory

        if not out_of_memory(e):
            raise
        print(f"gptforge {args.command}: error: out of memory ({str(e).splitlines()[0][:160]}); lower --batch-size "
              "(raise --grad-accum to keep the tokens per step), lower --block-size, or pick a smaller model", file=sys.stderr)
        return 2


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt
