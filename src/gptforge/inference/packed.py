"""Packed copies of a model's weights for generation on CPUs: the decoding kernel's layout for a step's few
rows (native.py) and oneDNN's for prompts, made once per layer and kept while the weights stay unchanged."""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from .. import calibrate
from ..kernels import enabled, fp32_cpu, onednn, onednn_linear
from . import native
from .int8 import Int8Linear

_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # nn.Linear -> (weight key, packed weight)


def _packed_weight(layer: nn.Linear | Int8Linear, kind: str = "onednn"):
    """`layer.weight` reordered for oneDNN (`kind="onednn"`) or for the decoding kernel (`"native"`; an
    Int8Linear's int8 weight and scales too), made once and reused until the weight changes (in-place updates
    bump the tensor's version, a new tensor changes its address); freed with the layer. One copy per layer."""
    w, scale = layer.weight, getattr(layer, "scale", None)
    vector = native.vector_width() if kind == "native" else 0  # the layout of the kernel of the level asked for
    key = (w.data_ptr(), w._version, kind, vector, None if scale is None else (scale.data_ptr(), scale._version))
    cached = _PACKED.get(layer)
    if cached is None or cached[0] != key:
        if kind == "native":
            packed = native.pack(w) if scale is None else native.pack_int8(w, scale)
        else:
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
        cached = _PACKED[layer] = (key, packed)
    return cached[1]


def decoding_weight(layer: nn.Linear | Int8Linear) -> native.Packed:
    """The layer's weight packed for the decoding kernel (native.py), kept with the layer as `_packed_weight`
    keeps it."""
    return _packed_weight(layer, "native")


def is_packed(layer: nn.Linear) -> bool:
    """Whether a packed copy of this layer's weight is held."""
    return layer in _PACKED


@contextlib.contextmanager
def cpu_inference_weights(model: nn.Module, keep: bool = True):
    """For the duration, the model's fp32 CPU `nn.Linear` layers multiply faster (gradients off), with the same
    products up to float rounding: a decoding step's few rows (at most native.MAX_ROWS) through the decoding
    kernel (native.py) on a copy packed for it; longer inputs (prompts) through oneDNN where it is used
    (`onednn()`), else torch's product; without the kernel, every product on a oneDNN-packed copy. The copies
    cost as much memory as the weights, made on first use (~0.15 s for `gpt2`) and, with `keep`, reused while
    the weights stay unchanged; without it (a model in training) dropped on exit. Elsewhere it does nothing.
    """
    layers = [
        m
        for m in model.modules()
        if isinstance(m, nn.Linear) and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
    ]
    if not layers or not (onednn() or (enabled() and native.available())):
        yield model
        return
    if enabled() and native.available():
        native.set_prefetch(calibrate.decision("prefetch"))

    def packed_forward(layer: nn.Linear):
        def forward(x: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled() or not fp32_cpu(x):
                return type(layer).forward(layer, x)  # the layer's own path
            if native.fits(x, layer.weight):  # a decoding step's few rows: bound by reading the weight
                return native.gemv(x, _packed_weight(layer, "native"), layer.bias)
            if not onednn():
                return type(layer).forward(layer, x)  # a prompt: torch's product
            # a prompt: oneDNN's GEMM, on its packed copy only where there is no kernel's copy to keep instead
            return onednn_linear(x, layer.weight if native.available() else _packed_weight(layer), layer.bias)

        return forward

    try:
        for m in layers:
            m.forward = packed_forward(m)
        yield model
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
            if not keep:
                _PACKED.pop(m, None)


__all__ = ["cpu_inference_weights", "decoding_weight", "is_packed"]
