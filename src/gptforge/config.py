"""GPT-2 model configuration: one dataclass, named presets, transformers' config.json format."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, ConfigError, NotFoundError, OptionError
from .options import DEFAULT_VOCAB_SIZE


@dataclass
class GPTConfig:
    """GPT-2 hyper-parameters, with transformers' GPT2Config field names and defaults."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    gradient_checkpointing: bool = False  # recompute block activations in backward to save memory
    extra: dict = field(default_factory=dict, repr=False)  # unknown config.json keys, kept on save

    def __post_init__(self) -> None:
        self.validate()

    @property
    def mlp_width(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise ConfigError(f"n_inner must be a positive integer or None, got {self.n_inner!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                f"choose n_embd a multiple of n_head (e.g. "
                f"n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))})"
            )
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError(
                f"activation_function={self.activation_function!r} is not supported; "
                f"choose one of {sorted(ACTIVATIONS)}"
            )
        if self.scale_attn_by_inverse_layer_idx or self.reorder_and_upcast_attn or not self.scale_attn_weights:
            raise ConfigError(
                "only standard GPT-2 attention is supported "
                "(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)"
            )

    # --- transformers config.json -------------------------------------------------

    def to_dict(self) -> dict:
        d = dict(_HF_DEFAULTS)
        d.update(
            {
                f.name: getattr(self, f.name)
                for f in dataclasses.fields(self)
                if f.name not in ("extra", "gradient_checkpointing")
            }
        )
        d.update(self.extra)
        d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_ctx=self.n_positions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        if d.get("model_type", "gpt2") != "gpt2":
            raise ConfigError(f"model_type is {d.get('model_type')!r}; gptforge loads GPT-2 models (model_type 'gpt2')")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        ignored = {"model_type", "architectures", "n_ctx", "use_cache", "transformers_version", "torch_dtype", "dtype"}
        extra = {
            k: v for k, v in d.items() if k not in names and k not in ignored and _HF_DEFAULTS.get(k, _MISSING) != v
        }
        return cls(**known, extra=extra)

    def save(self, path: str | os.PathLike, torch_dtype: str | None = None) -> None:
        """Write config.json; `torch_dtype` ("float32", "float16", "bfloat16") records the stored weights' dtype."""
        d = self.to_dict() | ({"torch_dtype": torch_dtype} if torch_dtype else {})
        Path(path).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GPTConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise NotFoundError(f"{path}: no config.json here; a model folder needs one (GPT2Config format)")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: holds a JSON {type(d).__name__}, not an object of GPT2Config fields")
        try:
            return cls.from_dict(d)
        except TypeError as e:
            raise ConfigError(f"{path}: {e}") from None

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count as GPT-2 reports it (a tied head counted once, an untied one as a matrix of its own;
        `non_embedding` leaves out wte, wpe and the head)."""
        d, L, h = self.n_embd, self.n_layer, self.mlp_width
        block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)
        n = L * block + 2 * d
        if not non_embedding:
            n += self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + self.n_positions * d
        return n

    def flops_per_token(self, block: int | None = None) -> float:
        """Training FLOPs per token, forward and backward: 6 per weight of the matrix products (the output
        head included: tied to wte, but its product is done) plus the attention products QK^T and AV over a
        context of `block` (12 * n_layer * n_embd * block, no discount for the causal mask)."""
        matmul_weights = self.num_params(non_embedding=True) + self.vocab_size * self.n_embd
        return 6 * matmul_weights + 12 * self.n_layer * self.n_embd * (block or self.n_positions)


# GPT2Config fields gptforge does not use, written with transformers' defaults; other values are kept in `extra`.
_HF_DEFAULTS = dict(
    summary_type="cls_index",
    summary_use_proj=True,
    summary_activation=None,
    summary_proj_to_labels=True,
    summary_first_dropout=0.1,
    use_cache=True,
)
_MISSING = object()

ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu", "relu2", "gelu_fast", "quick_gelu")

# Named sizes. The first four are OpenAI's GPT-2 releases; the small ones train usefully on a laptop CPU.
# The laptop presets train from scratch without dropout: a model that sees its data a few times is short
# of capacity, not overfitting (ten minutes of `tiny` on English fortunes, 11 passes over the data:
# 2.11 bits per byte without dropout, 2.17 with 0.1; docs/benchmarks.md). The GPT-2 sizes keep GPT-2's 0.1.
_LAPTOP = dict(
    vocab_size=DEFAULT_VOCAB_SIZE, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
)

PRESETS: dict[str, dict] = {
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),
    "tiny": dict(**_LAPTOP, n_positions=128, n_embd=128, n_layer=4, n_head=4),
    "mini": dict(**_LAPTOP, n_positions=256, n_embd=256, n_layer=8, n_head=8),
    "small": dict(**_LAPTOP, n_positions=512, n_embd=384, n_layer=6, n_head=6),
}


def preset(name: str, **overrides) -> GPTConfig:
    """A named config (see PRESETS), with any field overridden."""
    key = name.removeprefix("openai-community/")
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[key], **overrides})


def build_gpt2_config(
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_length: int = 32,
    dropout: float = 0.0,
    n_embd: int = 256,
    n_layer: int = 8,
    n_head: int = 8,
    **kwargs,
) -> GPTConfig:
    """A small GPT-2 config with the argument names older GPT-2 tools use.

    `max_length` is the context length (n_positions); `dropout` sets all three dropouts.
    """
    return GPTConfig(
        vocab_size=vocab_size,
        n_positions=max_length,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=kwargs.pop("bos_token_id", 0),
        eos_token_id=kwargs.pop("eos_token_id", 0),
        **kwargs,
    )


def model_overrides(dropout: float | None = None, attn_dropout: float | None = None, **fields) -> dict:
    """GPTConfig fields from the shape options a user gives (those not None): `dropout` sets the residual,
    embedding and attention dropout, `attn_dropout` the attention's alone (after `dropout`)."""
    overrides = {k: v for k, v in fields.items() if v is not None}
    for flag, p in (("--dropout", dropout), ("--attn-dropout", attn_dropout)):
        if p is not None and not 0 <= p < 1:
            raise OptionError(f"{flag} {p}: must be at least 0 and below 1 (1 would drop everything)")
    if dropout is not None:
        overrides.update(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    if attn_dropout is not None:
        overrides["attn_pdrop"] = attn_dropout
    return overrides


def is_preset(name) -> bool:
    """Whether `name` means a preset: a preset's name, and no file or folder of that name here."""
    return isinstance(name, str) and name.removeprefix("openai-community/") in PRESETS and not os.path.exists(name)


def resolve_config(spec: "GPTConfig | str | os.PathLike") -> GPTConfig:
    """A GPTConfig from itself, a preset name (`mini`, unless a file or folder of that name exists) or a
    config.json / model folder."""
    if isinstance(spec, GPTConfig):
        return spec
    if is_preset(spec):
        return preset(spec)
    return GPTConfig.load(spec)


# weight names of the blocks, h.0 ... h.N-1 (with or without the transformer. prefix)
BLOCK_KEY = re.compile(r"^(?:transformer\.)?h\.(\d+)\.(.+)$")


def check_block_count(names, config: GPTConfig, source: str = "weights") -> None:
    """The weights' blocks (h.0 ... h.N-1) are the config's n_layer: checked before any model is built, so a
    config.json that says a million layers beside a few never builds them."""
    found = {int(m[1]) for name in names if (m := BLOCK_KEY.match(name))}
    blocks = max(found) + 1 if found else 0
    if blocks != config.n_layer:
        raise CheckpointError(
            f"{source}: the weights hold {blocks} blocks but config.json says n_layer={config.n_layer}; "
            "the config does not belong to these weights"
        )
