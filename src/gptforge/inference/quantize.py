"""int8 weights for generation: quantize a GPT, and store or open an int8 model folder.

Every linear layer of the blocks and the output head get int8 weights with one fp32 scale per output
channel (`int8.Int8Linear`); embeddings, LayerNorms and biases stay fp32. Decoding one token reads
every weight once, so it is bound by memory bandwidth, and int8 weights are a quarter of the bytes.

    model = quantize_model(load_model("run"))              # on load: a second or two for gpt2
    save_model(model, "run-int8", tokenizer)               # or: gptforge quantize run --out run-int8

An int8 folder holds `model-int8.safetensors` (our module names, weights (out, in) as nn.Linear keeps
them, `<layer>.scale` beside each int8 `<layer>.weight`) and a `config.json` whose `quantization_config`
says `gptforge-int8`. `load_model` opens it; transformers does not (it finds no `model.safetensors`),
so the fp32 folder stays the one to share.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import GPTConfig
from ..errors import CheckpointError, OptionError
from ..fsio import atomic_write
from ..model import GPT
from .int8 import Int8Linear, is_int8

METHODS = ("int8",)
QUANT_METHOD = "gptforge-int8"
WEIGHTS_NAME = "model-int8.safetensors"


def check_method(method: str | None, flag: str = "--quantize") -> str | None:
    """`method` if it is a known quantization (or None); otherwise a one-line OptionError naming the flag."""
    if method is None or method in METHODS:
        return method
    given = f"{flag} {method!r}" if flag.startswith("--") else f"{flag}={method!r}"
    raise OptionError(f"{given}: unknown quantization; choose {', '.join(METHODS)}")


def quantization_of(config: GPTConfig) -> str | None:
    """The quantization a config declares: "int8" for gptforge's, None for fp32; another tool's is refused."""
    qc = config.extra.get("quantization_config")
    if qc is None:
        return None
    if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD:
        return "int8"
    method = qc.get("quant_method") if isinstance(qc, dict) else qc
    raise CheckpointError(
        f"the model is quantized with {method!r}, which gptforge cannot open; "
        "use its fp32 folder (gptforge quantizes to int8 itself with --quantize int8)"
    )


def refuse_quantized(config: GPTConfig, where, doing: str, hint: str = "") -> None:
    """Refuse an int8 folder where fp32 weights are needed: training, classification, adapters."""
    if quantization_of(config) is not None:
        raise OptionError(
            f"{where}: an int8 model folder cannot {doing}; give the fp32 base model it was quantized from{hint}"
        )


def _linear_layers(model: GPT) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) for every nn.Linear of the model, the tied head included."""
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]


def _declare(config: GPTConfig) -> GPTConfig:
    qc = {
        "quant_method": QUANT_METHOD,
        "bits": 8,
        "weights": "symmetric per output channel, fp32 scales",
        "layers": "attention, MLP and output head; embeddings, LayerNorms and biases fp32",
    }
    return dataclasses.replace(config, extra={**config.extra, "quantization_config": qc})


@torch.no_grad()
def quantize_model(model: GPT, method: str = "int8", inplace: bool = True) -> GPT:
    """The model with int8 linear layers and head (in place, or a copy with `inplace=False`), in eval mode.

    The output head gets its own int8 copy of the tied token embedding, which stays fp32 for the lookup.
    An already-int8 model is returned as it is."""
    check_method(method, "quantize")
    if is_int8(model):
        return model
    if not inplace:
        model = copy.deepcopy(model)
    for parent, name, layer in _linear_layers(model):
        setattr(parent, name, Int8Linear.from_linear(layer))
    model.config = _declare(model.config)
    return model.eval()


def save_quantized_weights(model: GPT, folder: str | os.PathLike) -> None:
    """Write the int8 weights file of a model folder atomically (`checkpoint.save_model` writes the rest)."""
    if not is_int8(model):
        raise OptionError("the model has fp32 weights; quantize_model(model) first")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "quantization": QUANT_METHOD}
    atomic_write(Path(folder) / WEIGHTS_NAME, lambda p: save_file(sd, str(p), metadata=meta))


def load_quantized(folder: str | os.PathLike, config: GPTConfig) -> GPT:
    """The int8 model of a folder that `checkpoint.save_model` wrote for an int8 model (on the CPU, eval mode)."""
    quantization_of(config)  # another tool's quantization is refused by name
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder}: config.json declares {QUANT_METHOD} weights but {WEIGHTS_NAME} is missing")
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read int8 weights ({type(e).__name__}); the file is damaged") from None
    from ..config import check_block_count

    check_block_count(sd, config, str(path))  # before the config's blocks are built
    model = GPT.empty(config)
    for parent, name, layer in _linear_layers(model):
        q = torch.empty(layer.weight.shape, dtype=torch.int8, device="meta")
        bias = None if layer.bias is None else torch.empty_like(layer.bias)
        setattr(parent, name, Int8Linear(q, torch.empty(q.size(0), device="meta"), bias))
    expected = model.state_dict()
    problems = sorted(set(expected) ^ set(sd)) or [k for k in sd if sd[k].shape != expected[k].shape]
    if problems:
        raise CheckpointError(
            f"{path}: tensors do not match the config ({', '.join(problems[:4])}); "
            "the folder was not written by `gptforge quantize` for this config"
        )
    model.load_state_dict(sd, assign=True)
    return model.eval()


__all__ = [
    "METHODS",
    "QUANT_METHOD",
    "WEIGHTS_NAME",
    "check_method",
    "load_quantized",
    "quantization_of",
    "quantize_model",
    "save_quantized_weights",
]
