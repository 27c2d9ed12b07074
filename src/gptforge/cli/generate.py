"""The commands that use a trained model's text: generate, eval (and its memorization report)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import OptionError
from ..options.flags import add_dataclass_options, option_values
from .args import ADAPTER_HELP, QUANTIZE_HELP


def _gather_prompts(args: argparse.Namespace) -> list[str]:
    from ..data.textfile import read_text_file

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

    from ..chat import Conversation
    from ..checkpoint import load_model_and_tokenizer, sampling_defaults
    from ..configfile import given_on_command_line
    from ..fsio import dated_path, write_text
    from ..generate import generate
    from ..inference.quantize import check_method
    from ..options import SamplingOptions

    options = option_values(args, SamplingOptions)
    SamplingOptions(**options).validate()  # bad options fail before the model loads
    check_method(args.quantize)
    if options["seed"] is None:
        options["seed"] = random.randrange(2**31)
        print(f"seed {options['seed']} (pass --seed {options['seed']} to get this text again)", file=sys.stderr)
    _check_outputs(args)
    prompts = [] if args.interactive else _gather_prompts(args)
    model, tokenizer = load_model_and_tokenizer(
        args.model, args.tokenizer, device=args.device, quantize=args.quantize, adapter=args.adapter
    )
    chat = Conversation(tokenizer, keep_history=args.interactive) if args.chat else None
    prompts = [chat.ask(p) for p in prompts] if chat else prompts
    given = given_on_command_line(args.parser, args.argv)  # the folder's generation_config.json sets the defaults
    options.update({k: v for k, v in sampling_defaults(model).items() if k not in given})
    SamplingOptions(**options).validate()
    common = dict(
        stop=args.stop, include_prompt=not (args.no_prompt or chat), context_keep=args.context_keep, **options
    )

    def run(batch: list[str], live: bool) -> list[str]:
        current = [None]

        def show(row: int, piece: str) -> None:
            if current[0] is not None and row != current[0]:
                sys.stdout.write(args.delimiter)
            current[0] = row
            sys.stdout.write(piece)
            sys.stdout.flush()

        texts = generate(
            model,
            tokenizer,
            batch,
            stream=show if live else None,
            progress=not live and len(batch) * options["num_samples"] > 1,
            **common,
        )
        if live:
            sys.stdout.write("\n")
        return texts

    if args.interactive:
        return _interactive(args, run, chat, live=not args.no_stream and options["num_beams"] == 1)
    # Stream when rows come one at a time; a batch of rows is printed when it is done, as is a beam search.
    one_at_a_time = len(prompts) * args.num_samples == 1 or args.batch_size == 1
    live = not args.no_stream and not args.out_dir and options["num_beams"] == 1 and one_at_a_time
    texts = run(prompts, live)
    if args.out_dir:
        path = dated_path(args.out_dir, options["seed"])
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, args.delimiter.join(texts) + "\n")
        print(f"wrote {len(texts)} sample(s) to {path}", file=sys.stderr)
    elif not live:
        print(args.delimiter.join(texts))
    return 0


def _check_outputs(args: argparse.Namespace) -> None:
    """--interactive reads stdin and prints; it takes no prompts, --out-dir or --lines. --out-dir is a folder."""
    if args.interactive and (args.prompt or args.prompt_option or args.out_dir or args.lines):
        given = [("a prompt", args.prompt or args.prompt_option), ("--out-dir", args.out_dir), ("--lines", args.lines)]
        raise OptionError(
            "--interactive reads its prompts from stdin and prints the answers; leave out "
            + ", ".join(f for f, v in given if v)
        )
    if args.out_dir and Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise OptionError(f"--out-dir {args.out_dir}: is a file, not a folder")


def _interactive(args: argparse.Namespace, run, chat, live: bool) -> int:
    """Read prompts line by line from stdin until EOF or exit; a chat keeps the conversation."""
    # streamed when the samples come one at a time; several at once are printed whole, not interleaved
    live = live and (args.num_samples == 1 or args.batch_size == 1)
    while True:
        if sys.stdin.isatty():
            print("prompt> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("exit", "quit"):
            return 0
        reply = run([chat.ask(line.rstrip("\n")) if chat else line.rstrip("\n")], live=live)
        if not live:
            print(args.delimiter.join(reply))
        if chat:
            chat.answer(reply[0])


def cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from ..evaluate import evaluate_files
    from ..inference.quantize import check_method
    from ..options import EvalOptions

    opts = EvalOptions(**option_values(args, EvalOptions))
    check_method(args.quantize)
    if args.memorization:
        return _memorization(args)
    if not args.files:
        raise OptionError("name the text files or prepared datasets to score (or give --memorization)")
    opened = dict(tokenizer=args.tokenizer, adapter=args.adapter, device=args.device, quantize=args.quantize)
    results = evaluate_files(args.model, args.files, opts, precision=args.precision, split=args.split, **opened)
    if args.json:
        print(json.dumps({k: dataclasses.asdict(r) for k, r in results.items()}, indent=2))
    else:
        width = max(map(len, results))
        for name, r in results.items():
            print(f"{name:{width}s}  {r}")
    return 0


def _memorization(args: argparse.Namespace) -> int:
    import json

    from ..memorization import report
    from ..options import MemorizationOptions

    if args.files or args.adapter or args.quantize:
        given = [
            f
            for f, v in (("files to score", args.files), ("--adapter", args.adapter), ("--quantize", args.quantize))
            if v
        ]
        raise OptionError(
            f"--memorization reports on the model folder alone; leave out {', '.join(given)} (run the "
            "perplexity evaluation separately)"
        )
    result = report(
        args.model, args.train_data, MemorizationOptions(**option_values(args, MemorizationOptions)), device=args.device
    )
    print(json.dumps(result.as_dict(), indent=2, ensure_ascii=False) if args.json else result)
    return 0


def _add_generate(sub) -> None:
    from ..options import SamplingOptions

    p = sub.add_parser(
        "generate",
        help="generate text from a model folder",
        description="Sample text with transformers' generation options. Prompts come from arguments, "
        "--prompt-file, or stdin ('-' or a pipe); an empty prompt starts from <|endoftext|>.",
    )
    p.add_argument("model", help="model folder (with its tokenizer) or hub id")
    p.add_argument("prompt", nargs="*", help="prompt text; several give several prompts; '-' reads stdin")
    p.add_argument(
        "-p",
        "--prompt",
        dest="prompt_option",
        action="append",
        default=[],
        help="a prompt, as an option (repeatable; may come after other options; '-' reads stdin)",
    )
    p.add_argument("--prompt-file", action="append", help="a file whose text is one prompt (repeatable)")
    p.add_argument("--lines", action="store_true", help="every non-empty line of the prompts is a prompt of its own")
    p.add_argument(
        "--interactive", action="store_true", help="read prompts line by line from stdin, stream each answer"
    )
    add_dataclass_options(p, SamplingOptions)
    p.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding (same as --no-do-sample)")
    p.add_argument(
        "--stop", action="append", default=[], help="stop a sample at this string, not included (repeatable)"
    )
    p.add_argument("--no-prompt", action="store_true", help="print only the generated text, not the prompt")
    p.add_argument(
        "--context-keep", type=int, help="tokens kept when the text outgrows the context (default: 3/4 of it)"
    )
    p.add_argument("--out-dir", help="write the samples to a file in this folder, named with the date and seed")
    p.add_argument("--delimiter", default="\n" + "=" * 40 + "\n", help="printed between samples")
    p.add_argument("--no-stream", action="store_true", help="print each sample when it is complete")
    p.add_argument("--tokenizer", help="tokenizer folder or tokenizer.json (default: the model folder's)")
    p.add_argument("--device", default="auto", help="auto (cuda, else mps on a Mac, else cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--quantize", metavar="int8", help=QUANTIZE_HELP)
    p.add_argument("--adapter", metavar="DIR", help=ADAPTER_HELP)
    p.add_argument(
        "--chat",
        action="store_true",
        help="each prompt is a user message put through the model's chat template "
        "(gptforge's GPT-2 template if it has none); only the answer is printed; --interactive keeps the conversation",
    )
    p.set_defaults(func=cmd_generate, parser=p)


def _add_eval(sub) -> None:
    from ..options import EvalOptions, MemorizationOptions

    p = sub.add_parser(
        "eval",
        help="perplexity, loss and bits per byte of text files or prepared datasets; "
        "--memorization: how much the model copies its training text",
        description="Sliding-window evaluation: windows of --block-size tokens every --stride tokens, "
        "each scoring only tokens not scored before. With --memorization: continuations "
        "sampled after validation prompts, checked for verbatim copies of the training text "
        "(docs/guide.md, 'Is it copying?').",
    )
    p.add_argument("model", help="model folder or hub id")
    p.add_argument("files", nargs="*", help="UTF-8 text files, or dataset folders written by `gptforge prepare`")
    add_dataclass_options(p, EvalOptions)
    p.add_argument(
        "--memorization",
        action="store_true",
        help="report how much of the model's text copies its "
        "training text, against the baseline of the validation text",
    )
    p.add_argument(
        "--train-data",
        action="append",
        metavar="PATH",
        help="--memorization of a model that is not a run "
        "folder: its training text (text files, repeatable, or a folder written by `gptforge prepare`)",
    )
    add_dataclass_options(p, MemorizationOptions)
    p.add_argument(
        "--split", default="val", choices=("train", "val"), help="split of a prepared dataset (default: val)"
    )
    p.add_argument("--tokenizer", help="tokenizer folder or tokenizer.json (default: the model folder's)")
    p.add_argument("--device", default="auto", help="auto (cuda, else mps on a Mac, else cpu), cpu, cuda, cuda:N, mps")
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="autocast dtype (default: fp32 on CPU, bf16 on CUDA)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--quantize", metavar="int8", help=QUANTIZE_HELP)
    p.add_argument("--adapter", metavar="DIR", help=ADAPTER_HELP)
    p.set_defaults(func=cmd_eval, parser=p)


def add_generate_commands(sub) -> None:
    _add_generate(sub)
    _add_eval(sub)
