"""The options of each operation, written once: training, sampling, evaluation, serving, and the
operations on tokenizers and model folders.

Each is a dataclass whose fields carry their help text; the `gptforge` command makes its flags from
them, the Python API takes them as keywords, and every default lives here. Nothing here imports torch,
so `gptforge --help` stays fast. (Reading and cleaning options are `options.data.ReadOptions`.)
"""

from .base import (
    AITEXTGEN_SAMPLING,
    DEFAULT_VOCAB_SIZE,
    MAX_LORA_ALPHA,
    MAX_NEW_TOKENS,
    PREVIEW_SAMPLING,
    check_fields,
    flag_of,
    opt,
    parse_duration,
    refuse_unknown,
)
from .data import PrepareOptions
from .generation import SamplingOptions
from .models import ExportOptions, MergeOptions, QuantizeOptions, TokenizerOptions
from .serve import SERVE_LOG_LEVELS, ServeOptions
from .tasks import (
    LORA_LAYERS,
    PREFERENCE_METHODS,
    ClassifyOptions,
    EvalOptions,
    InstructOptions,
    LoRAOptions,
    MemorizationOptions,
    PreferenceOptions,
)
from .train import (
    FINETUNE_DEFAULTS,
    MUON_LR_RATIO,
    REPORTERS,
    SCRATCH_DEFAULTS,
    TRAIN_GROUPS,
    TrainConfig,
    unset_defaults,
)

__all__ = [
    "AITEXTGEN_SAMPLING",
    "DEFAULT_VOCAB_SIZE",
    "PREVIEW_SAMPLING",
    "ClassifyOptions",
    "ExportOptions",
    "MergeOptions",
    "QuantizeOptions",
    "TokenizerOptions",
    "EvalOptions",
    "MemorizationOptions",
    "InstructOptions",
    "LORA_LAYERS",
    "PREFERENCE_METHODS",
    "PreferenceOptions",
    "LoRAOptions",
    "MAX_LORA_ALPHA",
    "MAX_NEW_TOKENS",
    "FINETUNE_DEFAULTS",
    "MUON_LR_RATIO",
    "PrepareOptions",
    "REPORTERS",
    "SCRATCH_DEFAULTS",
    "SamplingOptions",
    "SERVE_LOG_LEVELS",
    "ServeOptions",
    "TRAIN_GROUPS",
    "TrainConfig",
    "check_fields",
    "refuse_unknown",
    "unset_defaults",
    "flag_of",
    "opt",
    "parse_duration",
]
