"""Several LoRA adapters served beside one base model (`gptforge serve BASE --adapter name=DIR ...`).

No weights are merged: each adapted linear layer keeps the base's layer and, beside it, the low-rank update of
every adapter that adapts it (`StackedLoRA`). Before each pass the engine says which adapter each row runs under
(`AdapterSet.select`), and a layer adds adapter j's product s_j B_j A_j x to the rows under j only, so requests for
different adapters and for the base decode in one batch. Rows of the base alone cost the base's product and
nothing more. The update is the one `gptforge generate BASE --adapter DIR` merges into the weights (adapters.py
reads and checks the folder), so the tokens are the same up to float rounding.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adapters import lora_scaling, read_lora
from ..errors import OptionError
from ..model import GPT


class StackedLoRA(nn.Module):
    """A base linear layer (`base`, unchanged) and the updates (A, s B) of several adapters, by adapter number; each
    row of a pass gets the update of its own adapter (`AdapterSet.groups`), or none."""

    def __init__(self, base: nn.Linear, owner: "AdapterSet"):
        super().__init__()
        self.base, self.owner = base, owner
        self.updates: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for j, rows in self.owner.groups:
            update = self.updates.get(j)
            if update is None:
                continue
            a, b = update
            if rows is None:  # every row under this adapter
                y = y + F.linear(F.linear(x, a), b)
            else:
                y = y.index_add(0, rows, F.linear(F.linear(x.index_select(0, rows), a), b))
        return y


class AdapterSet:
    """The adapters of a served base, by name (number 0 is the base itself), attached to its layers."""

    def __init__(self, model: GPT, folders: dict[str, str | os.PathLike]):
        self.names = [None, *folders]
        self.groups: list[tuple[int, torch.Tensor | None]] = []
        self.device = model.transformer.wte.weight.device
        read = {name: read_lora(model, folder) for name, folder in folders.items()}  # all checked before any change
        layers: dict[str, StackedLoRA] = {}
        for j, (config, tensors, ranks, alphas) in enumerate(read.values(), start=1):
            rslora = bool(config.get("use_rslora"))
            for name, r in ranks.items():
                if name not in layers:
                    parent, _, child = name.rpartition(".")
                    layers[name] = StackedLoRA(model.get_submodule(name), self)
                    setattr(model.get_submodule(parent), child, layers[name])
                w = layers[name].base.weight
                a = tensors[f"{name}.lora_A.weight"].to(w.device, torch.float32)
                b = tensors[f"{name}.lora_B.weight"].to(w.device, torch.float32) * lora_scaling(r, alphas[name], rslora)
                layers[name].updates[j] = (a.to(w.dtype), b.to(w.dtype))

    def index(self, name: str) -> int:
        return self.names.index(name)

    def select(self, rows: list[int]) -> None:
        """The adapter of each row of the next passes (0: the base)."""
        used = sorted(set(rows) - {0})
        if len(used) == 1 and 0 not in rows:
            self.groups = [(used[0], None)]
        else:
            self.groups = [
                (j, torch.tensor([i for i, r in enumerate(rows) if r == j], device=self.device)) for j in used
            ]


def parse_adapter_flags(values: list[str] | None) -> tuple[str | None, dict[str, str]]:
    """`--adapter DIR` (merged into the base, at most one) and `--adapter name=DIR` (served beside it, by name)."""
    merged, named = [], {}
    for value in values or []:
        name, sep, folder = value.partition("=")
        if sep and name and "/" not in name and "\\" not in name and not os.path.isdir(value):
            if name in named:
                raise OptionError(f"--adapter {value}: the name {name!r} is given twice")
            named[name] = folder
        else:
            merged.append(value)
    if len(merged) > 1:
        raise OptionError(
            f"--adapter {merged[1]}: one adapter can be merged into the base; serve several beside it as "
            "--adapter NAME=DIR"
        )
    return (merged[0] if merged else None), named
