"""Adapter folders in peft's format, read and checked: adapter_config.json (every field gptforge reads, by type
and range) and adapter_model.safetensors (LoRA tensors of GPT-2's layers only, finite), and the base model a
folder names. adapters.py builds the LoRA layers from what is read here.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from .errors import CheckpointError, NotFoundError, OptionError
from .options import MAX_LORA_ALPHA

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's prefix of the wrapped model's parameter names
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def matches(name: str, targets: list[str]) -> bool:
    """peft's rule: a target matches a module whose name is it or ends with '.' + it."""
    return any(name == t or name.endswith("." + t) for t in targets)


def is_adapter(folder: str | os.PathLike) -> bool:
    return (Path(folder) / CONFIG_NAME).is_file()


def read_adapter(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """An adapter folder's config, its tensors under our names, and the safetensors metadata; unsupported
    peft features are refused by name."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise NotFoundError(f"{folder}: no such adapter folder")
    if not is_adapter(folder):
        raise CheckpointError(
            f"{folder}: not an adapter folder (no {CONFIG_NAME}); `gptforge train --lora-r 8` writes one"
        )
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG_NAME}: cannot be read as JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(
            f"{folder / CONFIG_NAME}: a {config.get('peft_type') if isinstance(config, dict) else '?'} "
            "adapter; gptforge opens LoRA adapters only"
        )
    check_adapter_config(config, folder / CONFIG_NAME)
    unsupported = [
        k
        for k in ("use_dora", "lora_bias", "modules_to_save", "layer_replication", "trainable_token_indices")
        if config.get(k)
    ] + ([f"bias={config['bias']!r}"] if config.get("bias", "none") != "none" else [])
    if unsupported:
        raise CheckpointError(
            f"{folder / CONFIG_NAME}: uses {', '.join(unsupported)}, which gptforge does not support; "
            "it opens plain LoRA adapters of a GPT-2 language model"
        )
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{folder}: no {WEIGHTS_NAME} (adapters saved as adapter_model.bin: re-save with peft's "
            "save_pretrained(safe_serialization=True))"
        )
    try:
        with safe_open(str(path), "pt") as f:
            meta, raw = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read the adapter weights ({str(e).splitlines()[0]})") from None
    tensors = {}
    for key, t in raw.items():
        name = key.removeprefix(PREFIX)
        if not name.startswith("transformer."):
            name = "transformer." + name  # an adapter of transformers' GPT2Model (no LM head wrapper)
        name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        if not LORA_KEY.match(name):
            raise CheckpointError(
                f"{path}: unexpected tensor {key!r}; gptforge opens LoRA adapters of GPT-2's layers only"
            )
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(
                f"{path}: {key} holds NaN or infinite values; the adapter is damaged (or its training diverged)"
            )
        tensors[name] = t
    if not tensors:
        raise CheckpointError(f"{path}: holds no LoRA tensors")
    return config, tensors, meta


def pattern_value(name: str, patterns: dict, default):
    """peft's rank_pattern / alpha_pattern: the value of the first key that is the layer's name or the end of it
    (keys are plain names: `check_adapter_config`)."""
    for key, value in (patterns or {}).items():
        if matches(name, [key]):
            return value
    return default


# A layer name, whole or its end (transformer.h.0.attn.c_attn, h.0.mlp.c_fc, c_proj). peft reads the keys of
# rank_pattern and alpha_pattern as regular expressions; gptforge takes plain names only, matched as peft matches
# target_modules: a file from elsewhere cannot make loading run for ever ("(.*)*(.*)*zzz") or fail inside `re`.
LAYER_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_adapter_config(config: dict, path: Path) -> None:
    """Every field of adapter_config.json that gptforge reads, by type and range; an error names the file and the
    field (the adapter was not made with gptforge's options, so no flag is named)."""

    def bad(field: str, value, need: str):
        raise CheckpointError(f"{path}: {field} {value!r}: {need}")

    def alpha(field: str, value) -> None:
        if not _finite(value) or abs(value) > MAX_LORA_ALPHA:
            bad(
                field,
                value,
                f"must be a finite number no larger than {MAX_LORA_ALPHA:g} (lora_alpha is usually r or 2 r)",
            )

    def rank(field: str, value) -> None:
        if not _integer(value) or value < 1:
            bad(field, value, "must be an integer above 0 (the adapter's rank, e.g. 8)")

    rank("r", config.get("r", 8))
    alpha("lora_alpha", config.get("lora_alpha", 8))
    dropout = config.get("lora_dropout")
    if dropout is not None and not (_finite(dropout) and 0 <= dropout < 1):
        bad("lora_dropout", dropout, "must be a number from 0 to below 1")
    for field in ("use_rslora", "fan_in_fan_out"):
        if config.get(field) is not None and not isinstance(config[field], bool):
            bad(field, config[field], "must be true or false")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        bad("base_model_name_or_path", base, "must be a string (a model folder or hub id)")
    targets = config.get("target_modules")
    if targets is not None and not (
        isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        bad("target_modules", targets, "must be a list of layer names")
    for field, check in (("alpha_pattern", alpha), ("rank_pattern", rank)):
        patterns = {} if config.get(field) is None else config[field]
        if not isinstance(patterns, dict):
            bad(field, patterns, "must be an object of layer names to values")
        for key, value in patterns.items():
            if not LAYER_NAME.fullmatch(key):
                bad(
                    f"{field} key",
                    key,
                    "gptforge takes plain layer names here (transformer.h.0.attn.c_attn, "
                    "h.0.mlp.c_fc), not regular expressions",
                )
            check(f"{field}[{key!r}]", value)


def adapter_base(folder: str | os.PathLike) -> str | None:
    """The base model an adapter folder names (peft's base_model_name_or_path), if any."""
    config, _, _ = read_adapter(folder)
    return config.get("base_model_name_or_path")


def resolve_base(model_path, adapter) -> tuple[str, str | None]:
    """(base, adapter) for `MODEL [--adapter DIR]`: MODEL may itself be an adapter folder (a LoRA run), whose
    base is the one its adapter_config.json names."""
    if adapter is None and model_path is not None and is_adapter(model_path):
        adapter = model_path
        model_path = adapter_base(adapter)
        if not model_path:
            raise OptionError(
                f"{adapter}: an adapter folder that names no base model; give the base and --adapter {adapter}"
            )
    return str(model_path), (str(adapter) if adapter is not None else None)
