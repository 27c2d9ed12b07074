"""Options of evaluation, the memorization report, LoRA adapters, instruction data and classification."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import OptionError
from .base import (
    MAX_LORA_ALPHA,
    check_fields,
    flag_of,
    opt,
)

# --- evaluation ---------------------------------------------------------------------------------------


@dataclass
class EvalOptions:
    """Sliding-window evaluation: windows of `block_size` tokens every `stride` tokens, each scoring only
    predictions no earlier window scored."""

    block_size: int | None = opt(None, "tokens per window (default: the model's context)")
    stride: int | None = opt(
        None, "tokens between windows (default: block size, no overlap); smaller gives each token more context"
    )
    batch_size: int = opt(8, "windows per forward pass")
    max_tokens: int | None = opt(None, "score only the first tokens of each input")

    def __post_init__(self) -> None:
        check_fields(
            self,
            {
                "block_size": (0, None, False, int),
                "stride": (0, None, False, int),
                "batch_size": (1, None, True, int),
                "max_tokens": (1, None, True, int),
            },
        )


@dataclass
class MemorizationOptions:
    """The memorization report (`gptforge eval RUN --memorization`): continuations sampled after prompts from the
    validation split, checked for verbatim copies of the training text."""

    mem_samples: int = opt(100, "continuations to sample")
    mem_tokens: int = opt(256, "tokens per continuation")
    mem_prompt_tokens: int = opt(32, "validation tokens before each continuation (at most a quarter of the context)")
    mem_seed: int = opt(0, "seed of the prompts' choice and of the sampling")
    mem_batch_size: int = opt(50, "continuations generated together (fewer use less memory)")
    mem_show: int = opt(5, "longest copies to list")

    def __post_init__(self) -> None:
        check_fields(
            self,
            {
                "mem_samples": (1, None, True, int),
                "mem_tokens": (1, None, True, int),
                "mem_prompt_tokens": (1, None, True, int),
                "mem_seed": (0, 2**63 - 1, True, int),
                "mem_batch_size": (1, None, True, int),
                "mem_show": (0, None, True, int),
            },
        )


# --- adapters and instruction tuning --------------------------------------------------------------------

LORA_LAYERS = ("c_attn", "c_proj", "c_fc")  # GPT-2's linear layers (transformers' Conv1D names)


@dataclass
class LoRAOptions:
    """LoRA (low-rank adapters, peft's LoRA): train r x (in + out) numbers per targeted layer instead of its
    weights; the base model is frozen and only the adapter is saved. `lora_r=None` means full fine-tuning."""

    lora_r: int | None = opt(None, "train a LoRA adapter of this rank instead of the whole model (e.g. 8)")
    lora_alpha: float = opt(16.0, "LoRA scale: the update is multiplied by lora_alpha / lora_r")
    lora_dropout: float = opt(0.05, "dropout on the adapter's input while training")
    lora_targets: str = opt(
        ",".join(LORA_LAYERS),
        "layers that get an adapter, comma-separated: names or suffixes such as c_attn, attn.c_proj, mlp.c_proj, c_fc",
    )

    def __post_init__(self) -> None:
        check_fields(
            self,
            {
                "lora_r": (0, None, False, int),
                "lora_alpha": (0, MAX_LORA_ALPHA, False, float),
                "lora_dropout": (0, 1, True, float, False),
            },
        )
        if not self.targets:
            raise OptionError(
                f"--lora-targets {self.lora_targets!r}: name at least one layer, e.g. {','.join(LORA_LAYERS)}"
            )

    @property
    def enabled(self) -> bool:
        return self.lora_r is not None

    @property
    def targets(self) -> list[str]:
        items = self.lora_targets.split(",") if isinstance(self.lora_targets, str) else list(self.lora_targets or [])
        return [t.strip() for t in items if t.strip()]


@dataclass
class InstructOptions:
    """Instruction and chat data (JSON Lines of prompt/completion or messages): whole examples, padded, with the
    loss on the answers only."""

    chat_template: str | None = opt(
        None,
        "a Jinja chat template file for `messages` data (default: the tokenizer's, "
        "else gptforge's GPT-2 template); stored in the model's tokenizer_config.json",
    )
    train_on_prompt: bool = opt(
        False, "also train on the prompt / user tokens (default: the loss is on the answers only)"
    )


# --- classification -------------------------------------------------------------------------------------


@dataclass
class ClassifyOptions:
    """Labelled data for `classify train` / `classify eval`, and how texts become inputs of the classifier."""

    text_field: str = opt("text", "CSV/TSV column (header name or 0-based index) or JSON field holding the text")
    label_field: str = opt("label", "CSV/TSV column (header name or 0-based index) or JSON field holding the label")
    header: bool = opt(True, "CSV/TSV: the first row names the columns (--no-header: it is data; use indices)")
    truncate: str = opt(
        "right",
        "texts longer than the context: right cuts the end (keeps the start), left keeps the end",
        choices=("right", "left"),
    )
    val_fraction: float = opt(0.1, "share of each label's examples held out for validation (stratified; 0: none)")
    balance: str = opt(
        "none",
        "imbalanced labels: none, weights (loss weighted by inverse class frequency) or sampling "
        "(every class drawn equally often)",
        choices=("none", "weights", "sampling"),
    )
    lm_weight: float = opt(
        0.0,
        "also train the language-model loss on the training texts, times this (GPT-1's auxiliary "
        "objective, e.g. 0.5); helps when examples are few",
    )
    dropout: float | None = opt(
        None, "residual, embedding and attention dropout while training (default: the --init model's)"
    )
    crop: float = opt(
        0.0,
        "augmentation: the share of training texts that a batch gives as a random span of at least "
        "half their tokens (e.g. 0.5), so the label is learnt from any part of a text; 0: whole texts",
    )

    def __post_init__(self) -> None:
        check_fields(
            self,
            {
                "val_fraction": (0, 0.9, True, float),
                "lm_weight": (0, None, True, float),
                "dropout": (0, 0.9, True, float),
                "crop": (0, 1, True, float),
            },
        )
        for name in ("truncate", "balance"):
            choices = next(f.metadata["choices"] for f in dataclasses.fields(self) if f.name == name)
            if getattr(self, name) not in choices:
                raise OptionError(
                    f"{flag_of(ClassifyOptions, name)} {getattr(self, name)!r}: choose {', '.join(choices)}"
                )


# --- preference tuning ------------------------------------------------------------------------------------

PREFERENCE_METHODS = ("dpo", "orpo")


@dataclass
class PreferenceOptions:
    """Preference pairs (JSON Lines of prompt/chosen/rejected): which objective, and how strongly it pulls."""

    preference: str | None = opt(
        None,
        "train on preference pairs ({prompt, chosen, rejected} lines): dpo (against the --init model as the "
        "reference) or orpo (no reference model)",
        choices=PREFERENCE_METHODS,
    )
    beta: float = opt(
        0.1,
        "DPO: how far the model may move from the reference (smaller: further); ORPO: the weight of the "
        "odds-ratio term beside the answers' loss (trl's beta)",
    )

    def __post_init__(self) -> None:
        check_fields(self, {"beta": (0, 100, False, float)})
        if self.preference is not None and self.preference not in PREFERENCE_METHODS:
            raise OptionError(f"--preference {self.preference!r}: choose {', '.join(PREFERENCE_METHODS)}")
