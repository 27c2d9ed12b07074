"""`gptforge classify train|eval|predict`: text classification from the command line. Thin: it parses and
calls `train.classification.train_classifier` and `classify`."""

from __future__ import annotations

import argparse
import functools
import json
import sys

from ..options.flags import option_values

CLASSIFY_EXAMPLES = """examples:
  gptforge classify train train.jsonl --init my_lm --out topic_clf --max-time 10m
  gptforge classify train reviews.csv --text-field 1 --label-field 0 --no-header --init gpt2 --freeze all-but:2 --out
  clf
  gptforge classify train folder_per_label/ --init tiny --balance weights --epochs 5 --out clf   # from scratch
  gptforge classify train train.jsonl --init gpt2 --lora-r 8 --out clf    # LoRA; saves the merged classifier
  gptforge classify eval topic_clf test.jsonl --json
  gptforge classify predict topic_clf "Some text" - --file notes.txt --json
"""


def cmd_classify_train(args: argparse.Namespace) -> int:
    from ..options import ClassifyOptions, LoRAOptions, TrainConfig
    from ..train.classification import train_classifier

    fields = functools.partial(option_values, args)
    result = train_classifier(
        args.inputs,
        init=args.init,
        eval_inputs=args.val_file,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        options=ClassifyOptions(**fields(ClassifyOptions)),
        lora=LoRAOptions(**fields(LoRAOptions)),
        encoding_errors=args.encoding_errors,
        **fields(TrainConfig),
    )
    return 130 if result.interrupted else 0


def _load(args: argparse.Namespace):
    from ..checkpoint import resolve_model_path
    from ..classify import load_classifier
    from ..fsio import folder_of
    from ..runtime import resolve_device
    from ..tokenizer import check_vocab_fits, load_tokenizer

    model = load_classifier(args.model, device=resolve_device(args.device))
    tokenizer = load_tokenizer(args.tokenizer or folder_of(resolve_model_path(args.model)))
    check_vocab_fits(tokenizer, model.config.vocab_size, f"the classifier {args.model}")
    return model, tokenizer


def cmd_classify_eval(args: argparse.Namespace) -> int:
    from ..classify import evaluate_classifier, format_metrics
    from ..data.labelled import read_labelled

    data = read_labelled(
        args.files, args.text_field, args.label_field, header=args.header, encoding_errors=args.encoding_errors
    )
    model, tokenizer = _load(args)
    m = evaluate_classifier(
        model,
        tokenizer,
        data.texts,
        data.labels,
        where=data.where,
        batch_size=args.batch_size,
        max_length=args.max_length,
        truncate=args.truncate,
    )
    print(json.dumps(m, indent=2) if args.json else format_metrics(m))
    return 0


def _texts(args: argparse.Namespace) -> list[str]:
    """The texts to classify: arguments ('-': stdin), --file text files (one text each) or labelled files
    (.csv/.tsv/.jsonl/.json: one text per row); --lines makes every non-empty line a text of its own."""
    from ..data.labelled import TABLE_FORMATS, read_labelled
    from ..data.textfile import read_text_file
    from ..errors import DataError

    texts = [sys.stdin.read() if t == "-" else t for t in args.texts]
    for f in args.file or []:
        if f.lower().endswith(tuple(TABLE_FORMATS)):
            texts += read_labelled(f, args.text_field, args.label_field, header=args.header, need_labels=False).texts
        else:
            texts.append(read_text_file(f))
    if not args.texts and not args.file and not sys.stdin.isatty():
        texts.append(sys.stdin.read())
    if args.lines:
        texts = [line for t in texts for line in t.splitlines() if line.strip()]
    if not texts:
        raise DataError("nothing to classify: give texts, '-' for stdin, or --file FILE")
    return texts


def cmd_classify_predict(args: argparse.Namespace) -> int:
    from ..classify import predict

    texts = _texts(args)
    model, tokenizer = _load(args)
    rows = predict(
        model, tokenizer, texts, batch_size=args.batch_size, max_length=args.max_length, truncate=args.truncate
    )
    for text, row in zip(texts, rows):
        if args.json:
            print(json.dumps({"text": text, **row}, ensure_ascii=False))
        else:
            preview = " ".join(text.split())
            print(f"{row['label']}\t{row['score']:.4f}\t{preview[:70] + ('...' if len(preview) > 70 else '')}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default: 32)")
    p.add_argument("--max-length", type=int, help="tokens kept of each text (default: the model's context)")
    p.add_argument(
        "--truncate",
        choices=("right", "left"),
        default="right",
        help="texts longer than --max-length: right keeps the start, left keeps the end (default: right)",
    )
    p.add_argument("--tokenizer", help="tokenizer folder or tokenizer.json (default: the model folder's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument(
        "--encoding-errors",
        choices=("strict", "replace"),
        default="strict",
        help="invalid UTF-8: stop with the file and byte offset (strict), or replace it with U+FFFD",
    )


def _fields(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--text-field", default="text", help="CSV/TSV column (name or 0-based index) or JSON field of the text"
    )
    p.add_argument(
        "--label-field", default="label", help="CSV/TSV column (name or 0-based index) or JSON field of the label"
    )
    p.add_argument(
        "--no-header", dest="header", action="store_false", help="CSV/TSV: the first row is data; use indices"
    )


def add_classify_commands(sub) -> None:
    """`classify` and its three actions."""
    from ..options import DEFAULT_VOCAB_SIZE, TRAIN_GROUPS, ClassifyOptions, LoRAOptions, TrainConfig
    from ..options.flags import add_dataclass_options

    p = sub.add_parser(
        "classify",
        help="text classification: train, evaluate and use a GPT-2 classifier",
        description="A GPT-2 body with a linear head on the last real token (transformers' "
        "GPT2ForSequenceClassification; the folders open there too).",
    )
    csub = p.add_subparsers(dest="classify_command", metavar="ACTION", required=True)
    t = csub.add_parser(
        "train",
        help="train a classifier on labelled texts",
        epilog=CLASSIFY_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Labelled inputs: .csv/.tsv (columns by name or index), .jsonl/.json (fields), or a "
        "folder with one sub-folder of text files per label. --max-length is the longest input "
        "kept (default: the model's context).",
    )
    groups = {title: t.add_argument_group(title) for title in TRAIN_GROUPS}
    g = groups["data"]
    g.add_argument("inputs", nargs="+", help="labelled files, or folders with a sub-folder per label")
    g.add_argument("--val-file", action="append", help="validation examples instead of a split (repeatable)")
    add_dataclass_options(g, ClassifyOptions)
    g.add_argument(
        "--encoding-errors",
        choices=("strict", "replace"),
        default="strict",
        help="invalid UTF-8: stop with the file and byte offset (strict), or replace it with U+FFFD",
    )
    g = groups["model"]
    g.add_argument(
        "--init",
        required=True,
        help="a language-model folder or hub id (body reused, new head), a classifier "
        "folder (trained further), or a preset: tiny, mini, small, gpt2 (from scratch)",
    )
    g.add_argument("--tokenizer", help="from scratch: use this tokenizer instead of training one on the inputs")
    g.add_argument(
        "--vocab-size",
        type=int,
        help=f"from scratch: vocabulary of the tokenizer trained (default: {DEFAULT_VOCAB_SIZE})",
    )
    add_dataclass_options(t, TrainConfig, groups)
    add_dataclass_options(t, LoRAOptions, groups)
    groups["data"].add_argument(  # a classifier's name for --block-size, as `classify eval` and `predict` have it
        "--max-length",
        dest="block_size",
        type=int,
        default=argparse.SUPPRESS,
        help="tokens kept of each text (default: the model's context; --block-size is the same)",
    )
    t.set_defaults(func=cmd_classify_train, parser=t)

    e = csub.add_parser("eval", help="accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix")
    e.add_argument("model", help="classifier folder (gptforge or transformers)")
    e.add_argument("files", nargs="+", help="labelled files, or folders with a sub-folder per label")
    _fields(e)
    _common(e)
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.set_defaults(func=cmd_classify_eval, parser=e)

    q = csub.add_parser("predict", help="the label and the probabilities of each text")
    q.add_argument("model", help="classifier folder (gptforge or transformers)")
    q.add_argument("texts", nargs="*", help="texts to classify; '-' reads stdin")
    q.add_argument(
        "--file", action="append", help="a text file (one text), or a .csv/.tsv/.jsonl/.json file (a text per row)"
    )
    q.add_argument("--lines", action="store_true", help="every non-empty line is a text of its own")
    _fields(q)
    _common(q)
    q.add_argument("--json", action="store_true", help="one JSON object per text: text, label, score, probs")
    q.set_defaults(func=cmd_classify_predict, parser=q)


__all__ = ["add_classify_commands"]
