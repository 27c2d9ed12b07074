"""`gptforge export RUN DIR`: the model of a run, and nothing else, with a model card.

A run folder is a model folder, but it also holds `data/` (the tokenized training text, which decodes back
to the corpus), `checkpoints/` and trainer state. Publishing it as it is would publish the corpus, so an
export copies only the files transformers needs, plus `README.md` (a Hugging Face model card) and the
loss picture it shows. `--format` writes the model for another runtime instead (`export_gguf.py` for
llama.cpp, `export_onnx.py` for ONNX Runtime, `export_ct2.py` for CTranslate2), with the same card.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .config import GPTConfig
from .errors import NotFoundError, OptionError, RunFolderError
from .fsio import atomic_dir, check_out_folder, read_json_lines, write_text
from .tokenizer import TOKENIZER_FILES

MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", *TOKENIZER_FILES, "chat_template.jinja")
# --format -> its --type values, the first the default; the card's library_name
FORMATS = {"transformers": ("f32",), "gguf": ("f32", "f16", "q8_0"), "onnx": ("f32", "int8"), "ct2": ("f32", "int8")}
_LIBRARY = {"transformers": "transformers", "gguf": "gguf", "onnx": "onnx", "ct2": "ctranslate2"}


def _json(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _rows(path: Path | None) -> list[dict]:
    return [] if path is None else read_json_lines(path)


def _last_sample(path: Path | None, limit: int = 600) -> str | None:
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    last = text.rsplit("=== step ", 1)[-1].split("\n", 1)[-1].strip() if "=== step " in text else ""
    return last[:limit] if last else None


def _model_step(folder: Path) -> int | None:
    """The step of the model in `folder`: a checkpoint's (step-N) or best/'s (its record); None for a final model."""
    match = re.fullmatch(r"step-(\d+)", folder.name)
    if match:
        return int(match.group(1))
    return _json(folder / "best_validation.json").get("step")


def run_facts(run: str | os.PathLike, model: str | os.PathLike | None = None) -> dict:
    """What a model card says about a run, read from its files: config, metrics, data, options, sample. `model`
    is the folder exported (the run's final model by default, or its best/ or a checkpoint): its config, and the
    metrics up to its step."""
    run = Path(run)
    model = Path(model) if model is not None else run
    config = GPTConfig.load(model)
    step = _model_step(model)
    rows = [r for r in _rows(_own(run, "metrics.jsonl")) if step is None or r.get("step", 0) <= step]
    given = _json(_own(run, "run_config.json"))
    options, resolved = given.get("options", {}), given.get("resolved", {})
    data_dir = (
        run / "data" if (run / "data" / "meta.json").is_file() else Path(str(options.get("data") or run / "data"))
    )
    return {
        "config": config,
        "params": config.num_params(),
        "val": next((r for r in reversed(rows) if "val_loss" in r), None),
        "memorization": next((r["memorization"] for r in reversed(rows) if "memorization" in r), None),
        "train": next((r for r in reversed(rows) if "loss" in r), None),
        "data": _json(data_dir / "meta.json"),
        "options": options,
        "train_config": resolved.get("train", {}),
        "sample": _last_sample(_own(run, "samples.txt")),
        "has_plot": (run / "loss.png").is_file() and _own(run, "loss.png") is not None,
        "labels": _labels(_json(model / "config.json")),
    }


def _labels(config: dict) -> list[str] | None:
    """A classifier's labels in id order, from its config.json (which names classify.ARCHITECTURE, not imported:
    export needs no torch); None for a language model."""
    if "GPT2ForSequenceClassification" not in (config.get("architectures") or []):
        return None
    id2label = config.get("id2label") or {}
    return [str(id2label.get(str(i), i)) for i in range(len(id2label))]


def _inside(path: Path, root: Path) -> bool:
    """Whether `path`, its links followed, is `root` or lies under it."""
    real, root = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    return real == root or root in real.parents


def _own(run: Path, name: str) -> Path | None:
    """`run / name` when it is the run's own file, None when a link takes it outside the run (a run folder from
    someone else must not put a file of this machine in the card)."""
    path = run / name
    return path if _inside(path, run) else None


def _memorization_line(memo: dict) -> str:
    """What the run's closing memorization report says, for the card (gptforge eval RUN --memorization)."""
    copied, base = memo.get("copied", {}), memo.get("baseline", {})
    line = (
        f"Copying: {copied.get('16', 0):.1%} of sampled tokens lie in verbatim copies of 16 or more training tokens "
        f"(the validation text itself: {base.get('16', 0):.1%}), over {memo.get('samples', 0)} short samples."
    )
    return line + (f" **Warning:** {memo['warning']}" if memo.get("warning") else "")


def _data_lines(meta: dict, options: dict) -> list[str]:
    if not meta:
        sources = options.get("inputs") or options.get("data") or options.get("hf_dataset")
        return [f"- Source: {sources}" if sources else "- Source: not recorded in the run folder"]
    names = ", ".join(Path(f["path"]).name for f in meta.get("inputs", [])[:10])
    more = f" and {len(meta['inputs']) - 10} more" if len(meta.get("inputs", [])) > 10 else ""
    train, val = meta.get("train", {}), meta.get("val", {})
    size = sum(f.get("bytes", 0) for f in meta.get("inputs", []) + meta.get("val_inputs", []))
    tok = meta.get("tokenizer", {})
    amount = f"{size / 1e6:,.1f} MB" if size >= 1e5 else f"{size:,} bytes"
    return [
        f"- Inputs: {names}{more} ({amount})",
        f"- Training split: {train.get('tokens', 0):,} tokens in {train.get('documents', 0):,} documents; "
        f"validation: {val.get('tokens', 0):,} tokens (split by {meta.get('val_split', 'documents')})",
        f"- Tokenizer: {tok.get('kind', 'bpe')}, {meta.get('vocab_size', 0):,} tokens",
    ]


def _training_lines(facts: dict) -> list[str]:
    cfg, opts, train = facts["train_config"], facts["options"], facts["train"]
    how = (
        f"fine-tuned from `{opts['init']}`" if opts.get("init") else "trained from scratch" if opts else "trained"
    )  # no run_config.json (a classifier run): what it started from is not recorded
    lines = [f"- {how} with gptforge"]
    if cfg:
        optimizer = (
            f"Muon (peak learning rate {cfg.get('muon_lr')}) for the block matrices, AdamW (peak learning "
            f"rate {cfg.get('learning_rate')}) for the rest"
            if cfg.get("optimizer") == "muon"
            else f"AdamW, peak learning rate {cfg.get('learning_rate')}"
        )
        lines.append(
            f"- Optimizer: {optimizer}, {cfg.get('schedule')} schedule, weight decay "
            f"{cfg.get('weight_decay')}, gradient clipping {cfg.get('grad_clip')}"
        )
        if cfg.get("ema"):
            lines.append(f"- Weights: an exponential moving average of the trained ones (decay {cfg.get('ema')})")
        block = cfg.get("block_size") or facts["config"].n_positions
        lines.append(
            f"- Batch: {cfg.get('batch_size')} sequences x {block} tokens x {cfg.get('grad_accum')} "
            f"accumulation; precision {cfg.get('precision')}; seed {cfg.get('seed')}"
        )
    if train:
        lines.append(
            f"- Steps: {train['step']:,} ({train.get('elapsed', 0) / 60:,.1f} minutes); last training loss "
            f"{train['loss']:.4f}"
        )
    return lines


def model_card(
    run: str | os.PathLike,
    license: str = "other",
    base_model: str | None = None,
    model: str | os.PathLike | None = None,
    format: str = "transformers",
    exported: tuple[str, list[str]] | None = None,
) -> str:
    """README.md for the exported model (`model`: the folder, by default the run's final model): front matter for
    the Hugging Face hub, then what the model is, what it was trained on, how well it does and how it was trained.
    `exported` (what was written, how to run it) replaces the transformers usage for another `format`."""
    facts = run_facts(run, model)
    c, val = facts["config"], facts["val"]
    base_model = base_model or facts["options"].get("init")
    labels = facts["labels"]
    task = "text-classification" if labels else "text-generation"
    front = [
        "---",
        f"library_name: {_LIBRARY[format]}",
        f"pipeline_tag: {task}",
        f"license: {license}",
        "tags:",
        "- gpt2",
        "- gptforge",
        f"- {task}",
        *([f"- {format}"] if format != "transformers" else []),
    ]
    if base_model and not Path(str(base_model)).exists():  # a hub id, not a local folder
        front.append(f"base_model: {base_model}")
    what = (
        f"A GPT-2 text classifier ({len(labels)} labels: {', '.join(labels)})" if labels else "A GPT-2 language model"
    )
    lines = front + [
        "---",
        "",
        f"# {Path(run).resolve().name}",
        "",
        f"{what} with {facts['params'] / 1e6:,.2f}M parameters ({c.n_layer} layers, "
        f"{c.n_embd} wide, {c.n_head} heads, a context of {c.n_positions} tokens, {c.vocab_size:,} tokens "
        "in its vocabulary), trained with [gptforge](https://pypi.org/project/gptforge/).",
        "",
        "## Training data",
        "",
        *_data_lines(facts["data"], facts["options"]),
        "",
        "## Evaluation",
        "",
        _evaluation(val),
    ]
    if facts.get("memorization"):
        lines += ["", _memorization_line(facts["memorization"])]
    if facts["has_plot"]:
        lines += ["", "![training and validation loss](loss.png)"]
    lines += ["", "## Training", "", *_training_lines(facts)]
    if exported:
        lines += ["", "## Export", "", exported[0]]
    lines += ["", "## Use", "", *(exported[1] if exported else _use_lines(bool(labels)))]
    if facts["sample"]:
        lines += ["", "## A sample", "", "```text", facts["sample"].replace("```", "'''"), "```"]
    limits = (
        "A small classifier trained on one set of examples: it knows only these labels, and the kind of text it saw. "
        if labels
        else "A small model trained on one corpus: it imitates that text and makes things up. "
    )
    lines += ["", "## Limitations", "", limits + "Check the training data's license before you publish the model."]
    return "\n".join(lines) + "\n"


def _evaluation(val: dict | None) -> str:
    """The card's evaluation sentence: a language model's perplexity, a classifier's accuracy and macro-F1."""
    if not val:
        return "No validation evaluation was recorded."
    if "val_perplexity" in val:
        bpb = f", {val['val_bits_per_byte']:.4f} bits per byte" if val.get("val_bits_per_byte") is not None else ""
        return (
            f"On {val.get('val_tokens', 0):,} held-out validation tokens: loss {val['val_loss']:.4f} nats per "
            f"token, perplexity {val['val_perplexity']:.2f}{bpb}."
        )
    names = (("val_accuracy", "accuracy"), ("val_macro_f1", "macro-F1"), ("val_loss", "loss"))
    figures = [f"{name} {val[key]:.4f}" for key, name in names if isinstance(val.get(key), (int, float))]
    return f"On {val.get('val_examples', 0):,} held-out validation examples: {', '.join(figures)}."


def _use_lines(classifier: bool) -> list[str]:
    if classifier:
        return [
            "```python",
            "from transformers import pipeline",
            "",
            'classify = pipeline("text-classification", model="PATH_OR_REPO_ID")',
            'print(classify("Some text"))',
            "```",
            "",
            'or `gptforge classify predict PATH_OR_REPO_ID "Some text"`.',
        ]
    return [
        "```python",
        "from transformers import pipeline",
        "",
        'generate = pipeline("text-generation", model="PATH_OR_REPO_ID")',
        'print(generate("Once upon a time")[0]["generated_text"])',
        "```",
        "",
        'or `gptforge generate PATH_OR_REPO_ID "Once upon a time"`. The sampling defaults are in '
        "`generation_config.json`.",
    ]


def _check_format(format: str, type: str | None, labels: list[str] | None, run: Path) -> str:
    """The --type to use (the format's default when None); refuses a pair that does not exist, and a classifier
    anywhere but the transformers folder (llama.cpp, ONNX and CTranslate2 exports are language models)."""
    if format not in FORMATS:
        raise OptionError(f"--format {format}: choose one of {', '.join(FORMATS)}")
    if type is not None and type not in FORMATS[format]:
        raise OptionError(f"--type {type}: --format {format} takes {', '.join(FORMATS[format])}")
    if labels and format != "transformers":
        raise OptionError(
            f"{run}: a text classifier; --format {format} exports language models (export it as the "
            "transformers folder)"
        )
    return type or FORMATS[format][0]


def _write_format(format: str, type: str, run: Path, copies: list[Path], tmp: Path, name: str) -> tuple[str, list[str]]:
    """Write `format` into the folder `tmp` (the model named `name`); what was written and how to run it."""
    if format == "gguf":
        from . import export_gguf

        export_gguf.write_gguf(run, tmp / export_gguf.FILE, type, name=name)
        return export_gguf.card_lines(type, GPTConfig.load(run).n_positions)
    if format == "onnx":
        from . import export_onnx

        export_onnx.write_onnx(run, tmp / export_onnx.FILE)
        if type == "int8":
            export_onnx.quantize_int8(tmp / export_onnx.FILE, tmp / export_onnx.INT8_FILE)
        for path in copies:  # the tokenizer to turn text into ids, the config and sampling defaults
            if path.name != "model.safetensors":
                shutil.copy2(path, tmp / path.name)
        config = GPTConfig.load(run)
        return export_onnx.card_lines(type, config.n_head, config.head_dim)
    from . import export_ct2

    source = tmp / ".transformers"  # the exported transformers folder is what CTranslate2's converter reads
    source.mkdir()
    for path in copies:
        shutil.copy2(path, source / path.name)
    export_ct2.write_ct2(source, tmp / ".ct2", type)
    for path in (tmp / ".ct2").iterdir():
        os.replace(path, tmp / path.name)
    shutil.rmtree(source)
    (tmp / ".ct2").rmdir()
    return export_ct2.card_lines(type)


def export_model(
    run: str | os.PathLike,
    out: str | os.PathLike,
    *,
    license: str = "other",
    force: bool = False,
    format: str = "transformers",
    type: str | None = None,
) -> Path:
    """Copy the model files of `run` (a finished run folder, `run/best` or a checkpoint) to `out`, with a model
    card; never the data, checkpoints or trainer state. `format` "gguf" (llama.cpp; `type` f32, f16 or q8_0),
    "onnx" (ONNX Runtime; f32 or int8) or "ct2" (CTranslate2; f32 or int8) writes the model for that runtime."""
    run, out = Path(run), Path(out)
    # the names of adapters.CONFIG_NAME and quantize.WEIGHTS_NAME (not imported: export needs no torch)
    if (run / "adapter_config.json").is_file():
        raise NotFoundError(
            f"{run}: a LoRA adapter, not a model; merge it into its base first (gptforge merge {run} "
            "--out FOLDER) and export that folder"
        )
    if (run / "model-int8.safetensors").is_file():
        raise NotFoundError(f"{run}: an int8 folder; export the fp32 folder it was quantized from")
    if not (run / "config.json").is_file() or not (run / "model.safetensors").is_file():
        raise NotFoundError(
            f"{run}: no model here (config.json and model.safetensors); a run folder holds its model "
            "once training finishes; for a stopped run export RUN/best or RUN/checkpoints/step-N"
        )
    type = _check_format(format, type, _labels(_json(run / "config.json")), run)
    if run.resolve() in out.resolve().parents:
        raise RunFolderError(f"{out}: is inside the run {run}; export to a folder of its own")
    check_out_folder(out, force, reads=(run,))
    # the run's records sit beside its final model, or above run/best and run/checkpoints/step-N
    records = next((d for d in (run, run.parent, run.parent.parent) if (d / "metrics.jsonl").is_file()), run)
    copies = [run / name for name in MODEL_FILES if (run / name).is_file()]
    plot = [p for p in [records / "loss.png"] if p.is_file()]
    for path in copies + plot:
        if not _inside(path, records):  # a run folder from someone else: a link to ~/.ssh/id_rsa
            raise RunFolderError(
                f"{path}: a link to {os.path.realpath(path)}, outside the run folder {records}; "
                "export copies only the run's own files (put the file itself in the run folder)"
            )
    with atomic_dir(out) as tmp:
        exported = None
        if format == "transformers":
            for path in copies:
                shutil.copy2(path, tmp / path.name)
        else:
            exported = _write_format(format, type, run, copies, tmp, Path(os.path.abspath(out)).name)
        for path in plot:
            shutil.copy2(path, tmp / path.name)
        write_text(tmp / "README.md", model_card(records, license=license, model=run, format=format, exported=exported))
    return out


__all__ = ["FORMATS", "MODEL_FILES", "export_model", "model_card", "run_facts"]
