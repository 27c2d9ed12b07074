"""LoRA adapters in peft's format: add them to a GPT, train them alone, save, load and merge them.

A LoRA layer keeps its base weight W frozen and learns a low-rank update: y = x W^T + b + s * B(A(dropout(x)))
with A (r, in), B (out, r) and s = lora_alpha / r (peft's LoRA; B starts at zero, so a new adapter changes
nothing). An adapter folder is what peft writes for transformers' GPT2LMHeadModel:

    adapter_config.json         peft_type LORA, r, lora_alpha, lora_dropout, target_modules, fan_in_fan_out=true
                                (GPT-2's layers are Conv1D there), task_type CAUSAL_LM, base_model_name_or_path
    adapter_model.safetensors   base_model.model.transformer.h.0.attn.c_attn.lora_A.weight, ...

`peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), folder)` opens it, and an adapter
peft trained opens here. A and B need no transposing: peft stores them as nn.Linear weights even for
Conv1D layers, and gptforge's layers are nn.Linear. The safetensors metadata also records the base's
vocabulary size and a fingerprint of its weights, so an adapter is never applied to another model unnoticed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn

from .adapter_files import (  # noqa: F401 - the folder side, re-exported: callers import it from here
    CONFIG_NAME,
    LORA_KEY,
    PREFIX,
    WEIGHTS_NAME,
    adapter_base,
    check_adapter_config,
    is_adapter,
    matches,
    pattern_value,
    read_adapter,
    resolve_base,
)
from .errors import CheckpointError, OptionError
from .fsio import atomic_write
from .kernels import Dropout, Linear, activation_down
from .model import GPT


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """The factor s of the update s * B A: alpha / r (peft's), or alpha / sqrt(r) with rank-stabilised LoRA."""
    return alpha / (math.sqrt(r) if rslora else r)


class LoRALinear(Linear):
    """A Linear layer (same `weight` and `bias`, frozen) with a trainable low-rank update beside it."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = Linear(base.in_features, r, **kw)
        self.lora_B = Linear(r, base.out_features, **kw)
        self.lora_dropout = Dropout(dropout) if dropout else nn.Identity()
        self.scaling = lora_scaling(r, alpha, rslora)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's initialisation: B = 0, no change yet
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the scaling on the r-wide middle: one output-sized temporary fewer
        return super().forward(x) + self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scaling)

    def after_activation(self, u: torch.Tensor, act) -> torch.Tensor:
        """self(act(u)), keeping only u for the backward pass (`kernels.activation_down`): the MLP's c_proj calls
        this, whose input act(u), the block's widest tensor, the adapter would otherwise keep once more."""
        p = self.lora_dropout.p if isinstance(self.lora_dropout, Dropout) and self.lora_dropout.training else 0.0
        h, down = activation_down(u, act, self.lora_A.weight, p)
        return super().forward(h) + self.lora_B(down * self.scaling)

    def merged(self) -> Linear:
        """A plain Linear with the update folded into its weight (W + s * B A)."""
        out = Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        with torch.no_grad():
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
            out.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype), requires_grad=False)
        out.bias = self.bias
        return out


def _linear_layers(model: GPT) -> dict[str, nn.Linear]:
    """The blocks' linear layers by name (the output head is tied to the embedding and never adapted)."""
    return {
        name: m for name, m in model.named_modules() if name.startswith("transformer.h.") and isinstance(m, nn.Linear)
    }


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def apply_lora(
    model: GPT,
    r: int,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets=("c_attn", "c_proj", "c_fc"),
    rslora: bool = False,
    ranks: dict[str, int] | None = None,
    alphas: dict[str, float] | None = None,
    base=None,
) -> list[str]:
    """Give the targeted layers a LoRA adapter and freeze everything else; the names of the adapted layers.

    `targets` are layer names or suffixes (c_attn, attn.c_proj, ...); `ranks` / `alphas` give single layers
    another rank or alpha (by full name). `base` names the base model in the saved adapter_config.json. The
    model keeps what saving needs (`model.lora`), so whatever saves it writes an adapter folder (`save_trained`)."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise OptionError(f"--lora-r {r!r}: must be an integer above 0 (e.g. 8)")
    layers = _linear_layers(model)
    chosen = [name for name in layers if matches(name, list(targets))]
    if not chosen:
        suffixes = sorted({n.split(".", 3)[-1] for n in layers})
        raise OptionError(
            f"--lora-targets {','.join(targets)!r} names no layer of the model; its layers are "
            f"{', '.join(suffixes)} (in each of transformer.h.0 ... h.{model.config.n_layer - 1})"
        )
    if has_lora(model):
        raise OptionError("the model already has LoRA adapters; merge them first (merge_lora, gptforge merge)")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        layer = layers[name]
        rank = (ranks or {}).get(name, r)
        _replace(
            model, name, LoRALinear(layer, rank, (alphas or {}).get(name, alpha), dropout, rslora).train(layer.training)
        )
    model.lora = {
        "r": r,
        "alpha": alpha,
        "dropout": dropout,
        "targets": list(targets),
        "rslora": rslora,
        "base": _base_name(base),
        "fingerprint": base_fingerprint(model),
    }
    return chosen


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_state_dict(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under our (= transformers') parameter names, on the CPU."""
    sd = state_dict if state_dict is not None else model.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in sd.items() if ".lora_A." in k or ".lora_B." in k}


def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its layer's weight: a plain GPT again, as fast as the base, that saves as usual."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            _replace(model, name, m.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    model.__dict__.pop("lora", None)
    return model


def base_fingerprint(model: nn.Module) -> str:
    """A hash of the base model's shapes and of a few thousand of its numbers per tensor (the adapters and a
    classifier's new head left out): cheap even for gpt2-xl, and different for any other model or any fine-tune
    of this one."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if ".lora_" in name or name.startswith("score."):
            continue
        t = p.detach().reshape(-1)
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(t[:: max(1, t.numel() // 4096)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


# --- adapter folders ---------------------------------------------------------------------------------------


def _base_name(base) -> str | None:
    """The base as peft's `base_model_name_or_path`: a hub id as given, a local folder as an absolute path."""
    if base is None:
        return None
    return str(Path(base).resolve()) if Path(base).exists() else str(base)


def save_adapter(
    model: GPT, folder: str | os.PathLike, tokenizer=None, *, state_dict: dict | None = None, base=None
) -> Path:
    """Write an adapter folder in peft's format, with the base's config.json (what the adapter fits) and the
    tokenizer files when given (they carry the chat template). `base` overrides the base model recorded."""
    from safetensors.torch import save_file

    info = getattr(model, "lora", None)
    tensors = lora_state_dict(model, state_dict)
    if info is None or not tensors:
        raise OptionError("the model has no LoRA adapter to save (apply_lora first)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": _base_name(base) or info.get("base"),
        "r": info["r"],
        "lora_alpha": info["alpha"],
        "lora_dropout": info["dropout"],
        "target_modules": _target_modules(tensors, model.config.n_layer),
        "fan_in_fan_out": True,
        "bias": "none",
        "use_rslora": info["rslora"],
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    meta = {
        "format": "pt",
        "gptforge.base_fingerprint": info.get("fingerprint") or base_fingerprint(model),
        "gptforge.vocab_size": str(model.config.vocab_size),
        "gptforge.n_positions": str(model.config.n_positions),
    }
    weights = {PREFIX + k: v for k, v in tensors.items()}
    atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(weights, str(p), metadata=meta))
    atomic_write(folder / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8"))
    atomic_write(folder / "config.json", model.config.save)
    if tokenizer is not None:
        tokenizer.save(folder, model_max_length=model.config.n_positions)
    return folder


def _target_modules(tensors: dict, n_layer: int) -> list[str]:
    """peft's target_modules naming exactly the adapted layers: `attn.c_proj` where every block has that layer
    adapted (a bare `c_proj` would also take mlp.c_proj), full names otherwise."""
    modules = {LORA_KEY.match(k)["module"] for k in tensors}
    kinds = {m.split(".", 3)[3] for m in modules}  # transformer.h.N.<attn.c_attn>
    out = []
    for kind in sorted(kinds):
        names = sorted(m for m in modules if m.endswith("." + kind))
        out += [kind] if len(names) == n_layer else names
    return out


def load_adapter_weights(model: GPT, folder: str | os.PathLike) -> None:
    """Put an adapter a run saved back into the LoRA layers of `model` (resume)."""
    _, tensors, meta = read_adapter(folder)
    check_adapter_fits(model, Path(folder), tensors, meta)
    state = model.state_dict()
    if set(tensors) != set(lora_state_dict(model, state)):
        raise CheckpointError(
            f"{folder}: its adapter covers other layers than this run's --lora-targets; resume with the "
            "options the run started with"
        )
    _copy_in(model, tensors, folder)


def read_lora(model: GPT, folder: str | os.PathLike, check_base: bool = True) -> tuple[dict, dict, dict, dict]:
    """An adapter folder read and checked against `model`: its config, its tensors, and the rank and alpha of each
    layer it adapts (peft's rank_pattern and alpha_pattern applied)."""
    folder = Path(folder)
    config, tensors, meta = read_adapter(folder)
    check_adapter_fits(model, folder, tensors, meta, check_base)
    modules = sorted({LORA_KEY.match(k)["module"] for k in tensors})
    ranks = {m: int(tensors[f"{m}.lora_A.weight"].shape[0]) for m in modules if f"{m}.lora_A.weight" in tensors}
    missing = [m for m in modules if m not in ranks or f"{m}.lora_B.weight" not in tensors]
    if missing:
        raise CheckpointError(
            f"{folder / WEIGHTS_NAME}: {missing[0]} has only one of lora_A / lora_B; the file is incomplete"
        )
    alpha = config.get("lora_alpha", 8)
    alphas = {m: pattern_value(m, config.get("alpha_pattern"), alpha) for m in modules}
    return config, tensors, ranks, alphas


def load_adapter(model: GPT, folder: str | os.PathLike, check_base: bool = True) -> list[str]:
    """Add the adapter of `folder` to `model` (checked against it) and freeze the rest; the adapted layers."""
    config, tensors, ranks, alphas = read_lora(model, folder, check_base)
    modules = list(ranks)
    apply_lora(
        model,
        int(config.get("r", 8)),
        config.get("lora_alpha", 8),
        float(config.get("lora_dropout") or 0.0),
        modules,
        bool(config.get("use_rslora")),
        ranks=ranks,
        alphas=alphas,
        base=config.get("base_model_name_or_path"),
    )
    _copy_in(model, tensors, folder)
    model.lora["targets"] = config.get("target_modules") or modules
    return modules


def _copy_in(model: GPT, tensors: dict[str, torch.Tensor], folder) -> None:
    state = model.state_dict()
    for name, t in tensors.items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{folder}: {name} has shape {tuple(t.shape)}, the model's adapter {tuple(state[name].shape)}; "
                "resume with the --lora-r the run started with"
            )
    with torch.no_grad():
        for name, t in tensors.items():
            state[name].copy_(t)


def check_adapter_fits(model: GPT, folder: Path, tensors: dict, meta: dict, check_base: bool = True) -> None:
    """The adapter was made for this model: its layers exist with these shapes, and (when the adapter says)
    the same vocabulary and the same base weights."""
    layers, c = _linear_layers(model), model.config
    for name, t in tensors.items():
        module, part = LORA_KEY.match(name)["module"], LORA_KEY.match(name)["part"]
        layer = layers.get(module)
        if layer is None:
            raise CheckpointError(
                f"{folder}: the adapter has a layer {module} that the model (n_layer={c.n_layer}) lacks; "
                "it was made for another base model"
            )
        need = layer.in_features if part == "A" else layer.out_features
        if t.dim() != 2 or t.shape[1 if part == "A" else 0] != need:
            raise CheckpointError(
                f"{folder}: {name} has shape {tuple(t.shape)}, which does not fit the model's {module} "
                f"({layer.out_features} x {layer.in_features}; n_embd={c.n_embd}); it was made for another base model"
            )
    vocab = meta.get("gptforge.vocab_size")
    if vocab is not None and int(vocab) != c.vocab_size:
        raise CheckpointError(
            f"{folder}: the adapter was trained on a model with vocab_size={vocab}, this one has "
            f"{c.vocab_size}; give the base model it was trained on"
        )
    want = meta.get("gptforge.base_fingerprint")
    if check_base and want and want != base_fingerprint(model):
        raise CheckpointError(
            f"{folder}: the adapter was trained on other base weights than these (fingerprint {want}, "
            f"this model {base_fingerprint(model)}); give the base model it was trained on"
        )


__all__ = [
    "LoRALinear",
    "adapter_base",
    "apply_lora",
    "base_fingerprint",
    "check_adapter_config",
    "check_adapter_fits",
    "has_lora",
    "is_adapter",
    "load_adapter",
    "load_adapter_weights",
    "lora_scaling",
    "lora_state_dict",
    "merge_lora",
    "read_adapter",
    "read_lora",
    "resolve_base",
    "save_adapter",
]
