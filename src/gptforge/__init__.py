"""gptforge: train GPT-2 language models on your own text."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("gptforge")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"

from .config import GPTConfig, ConfigError, PRESETS, preset, build_gpt2_config
from .model import GPT, KVCache
from .checkpoint import CheckpointError, load_model, save_model, model_info
from .tokenizer import Tokenizer, TokenizerError, check_vocab_fits, load_tokenizer, train_tokenizer
from .data import Batches, DataError, Prefetcher, TokenDataset, load_split, prepare
from .generate import SamplingOptions, generate, generate_ids, load_model_and_tokenizer
from .evaluate import EvalResult, evaluate_prepared, evaluate_text, evaluate_tokens
from .api import GPTForge, GPTForgeError
