"""`GPTForge`: one object for the train-from-scratch workflow that older GPT-2 tools made popular.

    ai = GPTForge(vocab_file="vocab.json", merges_file="merges.txt", config=config)   # fresh weights
    ai.train(data, batch_size=16, num_steps=5000)                                     # -> trained_model/
    ai.generate(n=3, prompt="The", max_length=100, temperature=0.7, top_p=0.9)
    ai = GPTForge(model="trained_model", config="trained_model/config.json", vocab_file=..., merges_file=...)

The object only holds a model, its tokenizer and whether the model is fresh or pretrained; every
operation is a call into the modules that own it (train.train, generate.generate, checkpoint, evaluate),
so the Python API and the `gptforge` command behave alike.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from .aliases import rename_keywords
from .checkpoint import load_model, resolve_model_path
from .config import GPTConfig, resolve_config
from .errors import GPTForgeError, OptionError  # GPTForgeError: re-exported for `from gptforge.api import ...`
from .fsio import atomic_write, dated_path, folder_of
from .model import GPT
from .options import AITEXTGEN_SAMPLING, TrainConfig
from .runtime import resolve_device
from .tokenizer import Tokenizer, check_vocab_fits, load_tokenizer


def _weights_path(model: str | os.PathLike) -> str | os.PathLike:
    """Older guides reload `trained_model/pytorch_model.bin`; gptforge writes `model.safetensors` in that
    folder instead, so a missing legacy file next to a safetensors file means the folder."""
    path = Path(model)
    if path.name == "pytorch_model.bin" and not path.exists() and (path.parent / "model.safetensors").is_file():
        return path.parent
    return model


class GPTForge:
    """A GPT-2 model and its tokenizer, to train, generate from, evaluate and save.

    * Fresh weights: `GPTForge(config=config, vocab_file=..., merges_file=...)` (or `tokenizer_file=`,
      `tokenizer=`). `config` is a GPTConfig (e.g. from `build_gpt2_config`), a preset name or a
      config.json; its vocab_size must equal the tokenizer's.
    * A trained or pretrained model: `GPTForge("trained_model")`, `GPTForge("gpt2")` (a hub id is
      downloaded only because you named it), or `GPTForge(model="trained_model/pytorch_model.bin",
      config="trained_model/config.json", vocab_file=..., merges_file=...)` as older guides write it.
      The tokenizer comes from the model folder unless you name one.

    `device="auto"` uses CUDA when there is a GPU. `quantize="int8"` gives the model int8 weights for faster
    generation on CPUs (gptforge.inference.quantize; an int8 model generates, evaluates and saves, but does not train).
    """

    def __init__(
        self,
        model: str | os.PathLike | GPT | None = None,
        config: GPTConfig | str | os.PathLike | None = None,
        vocab_file: str | os.PathLike | None = None,
        merges_file: str | os.PathLike | None = None,
        tokenizer_file: str | os.PathLike | None = None,
        *,
        tokenizer: Tokenizer | str | os.PathLike | None = None,
        model_folder: str | os.PathLike | None = None,
        device: str = "auto",
        quantize: str | None = None,
    ):
        from .inference.quantize import check_method, quantize_model

        check_method(quantize, "quantize")
        model = model if model is not None else model_folder
        self.device = resolve_device(device)
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        elif tokenizer is None and tokenizer_file is not None:
            tokenizer = load_tokenizer(tokenizer_file)
        elif tokenizer is None and vocab_file is not None:
            tokenizer = load_tokenizer(vocab_file, merges_file=merges_file)
        elif tokenizer is None and merges_file is not None:
            raise OptionError(f"merges_file={merges_file} needs vocab_file= too (the vocab.json it belongs to)")

        if model is None:
            # A model from a config: fresh GPT-2 weights.
            if config is None:
                raise OptionError(
                    "GPTForge needs model= (a model folder, weights file or hub id such as 'gpt2') "
                    "or config= (a GPTConfig from build_gpt2_config, for a new model)"
                )
            if tokenizer is None:
                raise OptionError(
                    "a new model needs its tokenizer: pass vocab_file= and merges_file=, tokenizer_file= "
                    "or tokenizer= (train one with gptforge.train_tokenizer)"
                )
            config = resolve_config(config)
            if tokenizer.vocab_size != config.vocab_size:
                raise OptionError(
                    f"the tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but the config has "
                    f"vocab_size={config.vocab_size}; build the config with vocab_size={tokenizer.vocab_size}"
                )
            config = dataclasses.replace(config, bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id)
            self.model, self.pretrained = GPT(config).to(self.device), False
        elif isinstance(model, GPT):
            if tokenizer is None:
                raise OptionError("GPTForge(model=<GPT object>) needs tokenizer= (or vocab_file=/tokenizer_file=)")
            self.model, self.pretrained = model.to(self.device), True
        elif tokenizer is None and config is None:
            # The folder's own tokenizer; fp32 weights, since this model may be trained further.
            from .checkpoint import load_model_and_tokenizer  # a LoRA run's adapter folder opens merged into its base

            self.model, tokenizer = load_model_and_tokenizer(
                _weights_path(model), device=str(self.device), dtype=torch.float32
            )
            self.pretrained = True
        else:
            path = resolve_model_path(_weights_path(model))
            self.model = load_model(path, config=None if config is None else resolve_config(config), device=self.device)
            self.pretrained = True
            if tokenizer is None:
                tokenizer = load_tokenizer(folder_of(path))
        if self.pretrained:
            check_vocab_fits(tokenizer, self.model.config.vocab_size)
        if quantize:
            quantize_model(self.model, quantize)
        self.tokenizer: Tokenizer = tokenizer
        self.source = (
            str(model) if isinstance(model, (str, os.PathLike)) else None
        )  # what a LoRA adapter names as its base

    @property
    def config(self) -> GPTConfig:
        return self.model.config

    def __repr__(self) -> str:
        c = self.config
        return (
            f"GPTForge({self.model.num_params() / 1e6:.2f}M parameters, n_layer={c.n_layer}, n_embd={c.n_embd}, "
            f"context {c.n_positions}, vocab {c.vocab_size}, {'pretrained' if self.pretrained else 'fresh'}, "
            f"{self.device})"
        )

    # -- training

    def dataset(self, files, block_size: int | None = None, line_by_line: bool = False, **options):
        """A TokenDataset of `files` encoded with this model's tokenizer (block size: the model's context)."""
        from .data.dataset import TokenDataset

        return TokenDataset(
            files,
            tokenizer=self.tokenizer,
            block_size=block_size or self.config.n_positions,
            line_by_line=line_by_line,
            **options,
        )

    def _check_block_size(self, block_size: int) -> None:
        n_ctx = self.config.n_positions
        if not self.pretrained and block_size != n_ctx:
            raise OptionError(
                f"the dataset's block_size is {block_size} but the config's max_length (n_positions) is "
                f"{n_ctx}; make them equal (TokenDataset(..., block_size={n_ctx}) or "
                f"build_gpt2_config(max_length={block_size}))"
            )
        if block_size > n_ctx:
            raise OptionError(
                f"the dataset's block_size is {block_size} but the model's context (n_positions) is "
                f"only {n_ctx}; use block_size <= {n_ctx}"
            )

    def train(
        self,
        data,
        batch_size: int = 16,
        num_steps: int | None = None,
        output_dir: str | os.PathLike = "trained_model",
        line_by_line: bool = False,
        fp16: bool = False,
        **options,
    ):
        """Train on `data`: a TokenDataset, a folder written by `gptforge prepare`, or text files (encoded with
        this model's tokenizer, in blocks of the model's context).

        Trains `num_steps` optimizer steps (default 5000 unless `epochs=` or `max_time=` is given) with a
        progress bar, samples and checkpoints as `gptforge train` does, and saves the model folder (weights,
        config, tokenizer) into `output_dir`. `options` are TrainConfig fields (learning_rate, grad_accum,
        max_time, save_steps, sample_interval, overwrite, resume, ...) or the names aitextgen and transformers'
        Trainer give them (num_train_epochs, per_device_train_batch_size, gradient_accumulation_steps,
        max_grad_norm, save_every, generate_every, ...: gptforge.aliases, listed in docs/cli.md). A previous run in
        `output_dir` is not replaced unless `overwrite=True`. `lora_r=8` (with lora_alpha, lora_dropout,
        lora_targets: LoRAOptions) trains a LoRA adapter and saves it alone, in peft's format. Callbacks
        (train/callbacks.py): on_step(trainer), on_log(trainer, row), on_evaluate(trainer, row),
        on_save(trainer, folder). Returns the TrainResult.
        """
        from .inference.int8 import is_int8
        from .options import LoRAOptions
        from .train.callbacks import NAMES as CALLBACKS
        from .train.finetune import check_lora, start_lora
        from .train.pipeline import train

        if is_int8(self.model):
            raise OptionError(
                "this model has int8 weights, which are for generation; train the fp32 model "
                "(GPTForge without quantize=) and quantize it afterwards"
            )
        fields = {f.name for f in dataclasses.fields(TrainConfig)} | {f.name for f in dataclasses.fields(LoRAOptions)}
        options = rename_keywords(options, fields | set(CALLBACKS), "train()")  # other tools' names (aliases.py)
        hooks = {k: options.pop(k) for k in CALLBACKS if k in options}
        batch_size, output_dir = options.pop("batch_size", batch_size), options.pop("out_dir", output_dir)
        num_steps = options.pop("max_steps", num_steps)
        if num_steps is None and not (options.get("epochs") or options.get("max_time")):
            num_steps = 5000  # older tools' default length
        lora = LoRAOptions(
            **{k: options.pop(k) for k in [f.name for f in dataclasses.fields(LoRAOptions)] if k in options}
        )
        if fp16:
            options["precision"] = "fp16"
        block_size = getattr(data, "block_size", None) or options.get("block_size") or self.config.n_positions
        self._check_block_size(block_size)  # before any text is encoded
        if isinstance(data, (str, os.PathLike, list, tuple)) and not (Path(str(data)) / "meta.json").is_file():
            data = self.dataset(data, block_size=block_size, line_by_line=line_by_line)
        data_tok = getattr(data, "tokenizer", None)
        if data_tok is not None and data_tok.fingerprint != self.tokenizer.fingerprint:
            raise OptionError(
                f"the dataset was encoded with another tokenizer ({data_tok.source}) than the model's "
                f"({self.tokenizer.source}); build the TokenDataset with the model's vocab_file/merges_file"
            )
        if self.device.type != "cpu":
            options.setdefault("device", str(self.device))
        options.update(out_dir=str(output_dir), batch_size=batch_size, block_size=block_size)
        if num_steps is not None:
            options["max_steps"] = num_steps
        if lora.enabled:
            cfg = TrainConfig(**options)
            check_lora(lora, cfg, "model" if self.pretrained else None)
            options["learning_rate"] = start_lora(self.model, lora, cfg, self.source).learning_rate
        return train(self.model, data, tokenizer=self.tokenizer, finetune=self.pretrained, **hooks, **options)

    # -- generation

    def generate(
        self,
        n: int = 1,
        prompt: str = "",
        max_length: int | None = 100,
        temperature: float = AITEXTGEN_SAMPLING["temperature"],
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        return_as_list: bool = False,
        max_new_tokens: int | None = None,
        **options,
    ) -> list[str] | None:
        """`n` samples after `prompt`, printed (separated by a line of `=`), or returned when `return_as_list`.

        `max_length` counts the prompt's tokens too, as in older tools and transformers; `max_new_tokens`
        counts only new ones and wins when given. Generation stops early at <|endoftext|>. Other options are
        those of `gptforge.generate` (repetition_penalty, no_repeat_ngram_size, stop, min_new_tokens, ...).
        The same seed gives the same text.
        """
        from .generate import generate

        if max_new_tokens is None:
            used = len(self.tokenizer.encode(prompt)) if prompt else 0
            if max_length is None or max_length <= used:
                raise OptionError(
                    f"max_length={max_length} leaves no room after the prompt's {used} tokens; "
                    "raise max_length or pass max_new_tokens="
                )
            max_new_tokens = max_length - used
        chosen = {k: v for k, v in dict(top_k=top_k, top_p=top_p).items() if v is not None}
        texts = generate(
            self.model.eval(),
            self.tokenizer,
            prompt,
            num_samples=n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            **chosen,
            **options,
        )
        if return_as_list:
            return texts
        print(("\n" + "=" * 10 + "\n").join(texts))
        return None

    def generate_to_file(
        self,
        n: int = 20,
        destination_path: str | os.PathLike | None = None,
        sample_delim: str = "=" * 20 + "\n",
        seed: int | None = None,
        **options,
    ) -> Path:
        """Write `n` samples to `destination_path` (default: a new `gptforge-<date>-seed<seed>.txt` here);
        an existing file is never replaced. Options as in `generate`. Returns the path written."""
        import random

        seed = random.randrange(2**31) if seed is None else seed
        path = Path(destination_path) if destination_path is not None else dated_path(".", seed)
        if path.exists():
            raise OptionError(f"{path}: already exists; choose another destination_path")
        texts = self.generate(n=n, seed=seed, return_as_list=True, **options)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda p: p.write_text("".join(t + "\n" + sample_delim for t in texts), encoding="utf-8"))
        return path

    # -- evaluation and saving

    def evaluate(self, data, **options):
        """Loss, perplexity and bits per byte (an EvalResult) of text files or strings, a folder written by
        `gptforge prepare` (its val split), or a TokenDataset (its val split, else its train split).
        Options are those of `gptforge.evaluate.evaluate_tokens` (block_size, stride, batch_size, max_tokens)."""
        from .evaluate import evaluate_prepared, evaluate_text

        folder = getattr(data, "data_dir", None)
        if folder is None and isinstance(data, (str, os.PathLike)) and (Path(data) / "meta.json").is_file():
            folder = data
        if folder is not None:
            split = options.pop("split", "val" if len(getattr(data, "val", [1])) else "train")
            return evaluate_prepared(self.model, folder, split=split, **options)
        return evaluate_text(self.model, self.tokenizer, data, **options)

    def save(self, folder: str | os.PathLike = "trained_model", overwrite: bool = False) -> Path:
        """Write the model folder (config.json, model.safetensors, generation_config.json and the tokenizer
        files) that `GPTForge(folder)`, `gptforge generate` and transformers open. A folder that already
        holds a model is replaced only with `overwrite=True`."""
        folder = Path(folder)
        if (folder / "config.json").exists() and not overwrite:
            raise OptionError(
                f"{folder}: already holds a model; pass overwrite=True to replace it or choose another folder"
            )
        from .checkpoint import save_trained  # a model with LoRA layers saves its adapter alone

        return save_trained(self.model, folder, self.tokenizer)


class GPTForgeClassifier:
    """A GPT-2 text classifier (transformers' GPT2ForSequenceClassification) and its tokenizer.

        clf = GPTForgeClassifier.train("train.jsonl", init="my_lm", output_dir="topic_clf", max_time="10m")
        clf = GPTForgeClassifier("topic_clf")            # a folder written by gptforge or by transformers
        clf.predict(["Some text"])                       # [{"label": ..., "score": ..., "probs": {...}}]
        clf.evaluate("test.jsonl")                       # accuracy, macro_f1, per_class, confusion, loss

    The same operations as `gptforge classify train|eval|predict`, with the same options and defaults."""

    def __init__(self, model: str | os.PathLike, device: str = "auto", tokenizer: str | os.PathLike | None = None):
        from .classify import load_classifier

        self.device = resolve_device(device)
        self.model = load_classifier(model, device=self.device)
        self.tokenizer = load_tokenizer(tokenizer or folder_of(resolve_model_path(model)))
        check_vocab_fits(self.tokenizer, self.model.config.vocab_size)

    @property
    def labels(self) -> list[str]:
        return list(self.model.labels)

    def __repr__(self) -> str:
        return (
            f"GPTForgeClassifier({self.model.num_params() / 1e6:.2f}M parameters, labels {self.labels}, {self.device})"
        )

    @classmethod
    def train(
        cls, data, init: str, output_dir: str | os.PathLike = "classifier", eval_data=None, **options
    ) -> "GPTForgeClassifier":
        """Train on labelled files (.csv/.tsv, .jsonl/.json, or a folder with a sub-folder per label) and open the
        result. `init`: a language-model folder or hub id, a classifier folder, or a preset (from scratch).
        `options` are ClassifyOptions fields (text_field, label_field, truncate, val_fraction, balance, lm_weight,
        crop), TrainConfig fields (max_time, epochs, learning_rate, freeze, resume, ...), LoRAOptions fields (lora_r,
        ...),
        tokenizer/vocab_size, the callbacks (on_step, on_log, on_evaluate, on_save) and
        compute_metrics(probabilities, label_ids) -> {name: number}, added to each evaluation as val_<name>."""
        from .options import ClassifyOptions, LoRAOptions
        from .train.callbacks import NAMES as CALLBACKS
        from .train.classification import train_classifier

        names = {f.name for f in dataclasses.fields(ClassifyOptions)}
        lora_names = {f.name for f in dataclasses.fields(LoRAOptions)}
        known = names | lora_names | {f.name for f in dataclasses.fields(TrainConfig)}
        known |= {"tokenizer", "vocab_size", "encoding_errors", "compute_metrics", *CALLBACKS}
        options = rename_keywords(options, known, "train()")  # Trainer's names (aliases.py), unknown ones refused
        output_dir = options.pop("out_dir", output_dir)
        clf_opts = ClassifyOptions(**{k: options.pop(k) for k in list(options) if k in names})
        lora = LoRAOptions(**{k: options.pop(k) for k in list(options) if k in lora_names})
        if isinstance(options.get("max_time"), str):
            from .options import parse_duration

            options["max_time"] = parse_duration(options["max_time"])
        result = train_classifier(
            data, init=init, eval_inputs=eval_data, options=clf_opts, lora=lora, out_dir=str(output_dir), **options
        )
        clf = cls(output_dir, device=options.get("device", "auto"))
        clf.result = result
        return clf

    def predict(self, texts: str | list[str], batch_size: int = 32, truncate: str = "right") -> list[dict]:
        """For each text: `{"label", "score", "probs": {label: probability}}`."""
        from .classify import predict

        texts = [texts] if isinstance(texts, str) else list(texts)
        return predict(self.model, self.tokenizer, texts, batch_size=batch_size, truncate=truncate)

    def evaluate(
        self,
        data,
        labels: list[str] | None = None,
        batch_size: int = 32,
        truncate: str = "right",
        text_field: str = "text",
        label_field: str = "label",
        header: bool = True,
    ) -> dict:
        """Accuracy, macro-F1, per-class precision/recall/F1, the confusion matrix and the loss, on labelled files
        (`data`), or on texts `data` with their `labels`."""
        from .classify import evaluate_classifier
        from .data.labelled import read_labelled

        if labels is None:
            d = read_labelled(data, text_field, label_field, header=header)
            texts, labels, where = d.texts, d.labels, d.where
        else:
            texts, where = ([data] if isinstance(data, str) else list(data)), None
        return evaluate_classifier(
            self.model, self.tokenizer, texts, list(labels), where=where, batch_size=batch_size, truncate=truncate
        )

    def save(self, folder: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the classifier folder (transformers' GPT2ForSequenceClassification format, tokenizer included)."""
        from .classify import save_classifier

        folder = Path(folder)
        if (folder / "config.json").exists() and not overwrite:
            raise OptionError(
                f"{folder}: already holds a model; pass overwrite=True to replace it or choose another folder"
            )
        return save_classifier(self.model, folder, self.tokenizer)


__all__ = ["GPTForge", "GPTForgeClassifier", "GPTForgeError"]
