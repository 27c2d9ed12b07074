"""Options of the operations on tokenizers and model folders: tokenizer training, export, merge and quantize.
The library functions keep these defaults as keyword defaults (tests/test_defaults.py holds them equal)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import DEFAULT_VOCAB_SIZE, opt

FORCE_HELP = "replace the folder if it already holds files"


@dataclass
class TokenizerOptions:
    """A tokenizer trained on your text (`gptforge tokenizer train`, `gptforge.train_tokenizer`)."""

    vocab_size: int = opt(DEFAULT_VOCAB_SIZE, "number of tokens, <|endoftext|> included")
    min_frequency: int = opt(2, "ignore merges / characters seen fewer times")
    kind: str = opt(
        "bpe",
        "bpe: GPT-2 byte-level BPE; char: one token per character (unseen characters become <|unk|>)",
        choices=("bpe", "char"),
    )
    force: bool = opt(False, "replace tokenizer files already in --out")


@dataclass
class ExportOptions:
    """A run's model copied for sharing or for another engine (`gptforge export`, `export.export_model`)."""

    license: str = opt("other", "license in the model card (e.g. mit, apache-2.0, cc-by-4.0)")
    format: str = opt(
        "transformers",
        "transformers: the model folder; gguf: one file for llama.cpp (pip install 'gptforge[gguf]'); onnx: the "
        "decoder with its cache for ONNX Runtime ('gptforge[onnx]'); ct2: CTranslate2's converter on the folder "
        "('gptforge[ct2]')",
        choices=("transformers", "gguf", "onnx", "ct2"),
    )
    type: str | None = opt(
        None,
        "weights: gguf f32 (default), f16 or q8_0; onnx and ct2 f32 (default) or int8",
        choices=("f32", "f16", "q8_0", "int8"),
    )
    force: bool = opt(False, FORCE_HELP)


@dataclass
class MergeOptions:
    """A LoRA adapter folded into its base (`gptforge merge`, `checkpoint.merge_to_folder`)."""

    force: bool = opt(False, FORCE_HELP)


@dataclass
class QuantizeOptions:
    """An int8 copy of a model folder (`gptforge quantize`, `checkpoint.quantize_folder`)."""

    method: str = opt("int8", "quantization (the one choice: int8)")
    force: bool = opt(False, FORCE_HELP)
