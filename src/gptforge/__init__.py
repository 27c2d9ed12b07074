"""gptforge: train GPT-2 language models on your own text.

The public API is imported on first use, so that `gptforge --help` and `import gptforge` stay fast
(torch is imported only when a name that needs it is used). The functions `generate` and `train` share
their names with their modules: import them from there (`from gptforge.generate import generate`).
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("gptforge")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"

_EXPORTS = {
    "errors": [
        "GPTForgeError",
        "CheckpointError",
        "ConfigError",
        "DataError",
        "OptionError",
        "TokenizerError",
        "TrainingError",
    ],
    "options": ["TrainConfig", "SamplingOptions", "EvalOptions"],
    "config": ["GPTConfig", "PRESETS", "preset", "build_gpt2_config"],
    "model": ["GPT", "KVCache"],
    "checkpoint": ["load_model", "save_model", "model_info", "load_model_and_tokenizer"],
    "tokenizer": ["Tokenizer", "check_vocab_fits", "load_tokenizer"],
    "tokenizer_training": ["train_from_texts"],
    "data": ["Batches", "Prefetcher", "ReadOptions", "TokenDataset", "load_split", "prepare", "train_tokenizer"],
    "generate": ["generate_ids"],
    "evaluate": ["EvalResult", "evaluate_prepared", "evaluate_text", "evaluate_tokens"],
    "train": ["Trainer", "TrainResult", "run_training"],
    "api": ["GPTForge", "GPTForgeClassifier"],
    "classify": ["GPTClassifier", "load_classifier", "save_classifier"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'gptforge' has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
