"""int8 weights: one fp32 scale per output row (`quantize_rows`), the int8 linear layer (fbgemm's int8
products on x86 CPUs, the plain product elsewhere), and the one test of whether a model holds int8 weights."""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import enabled


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: `weight ~= q * scale[:, None]`, q in [-127, 127], scale fp32."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def _fbgemm_pack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """fbgemm's packed form of an int8 weight (torch's quantized-tensor API, deprecated but shipped)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zero = torch.zeros(q.size(0), dtype=torch.long)
        qw = torch._make_per_channel_quantized_tensor(q.cpu(), scale.double().cpu(), zero, 0)
        engine = torch.backends.quantized.engine
        torch.backends.quantized.engine = "fbgemm"
        try:
            return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.detach().float().cpu())
        finally:
            torch.backends.quantized.engine = engine


@functools.lru_cache(maxsize=1)
def _fbgemm_reduce_range() -> bool | None:
    """None when this torch has no working fbgemm int8 product; else whether activations must use 7 bits.

    fbgemm quantizes each call's input to uint8 and multiplies it with the int8 weight. CPUs without VNNI
    add pairs of u8 x s8 products in int16, which saturates for 8-bit inputs: a product of all-maximal
    values shows it, and then inputs get 7 bits (`reduce_range`), as torch's dynamic quantization does."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(5, 64, generator=g), torch.randn(24, 64, generator=g), torch.randn(24, generator=g)
        q, scale = quantize_rows(w)
        got = torch.ops.quantized.linear_dynamic(x, _fbgemm_pack(q, scale, b), True)
        full = torch.ops.quantized.linear_dynamic(
            torch.ones(1, 64), _fbgemm_pack(*quantize_rows(torch.ones(2, 64)), None), False
        )
    except (AttributeError, RuntimeError):
        return None
    ref = F.linear(x, q.float() * scale[:, None], b)
    if not (got - ref).abs().max() <= 0.03 * ref.abs().max():  # 7-bit inputs: about 1% of the largest output
        warnings.warn("fbgemm int8 products disagree with the plain ones on this machine; using the plain products")
        return None
    return not torch.allclose(full, torch.full_like(full, 64.0), rtol=0.02)


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and one fp32 scale per output: y = x @ (q * scale).T + bias.

    On x86 CPUs with fbgemm (fp32 input, no autograd) the product is fbgemm's dynamic int8 one: each call
    quantizes its input to uint8 (one scale for the call) and multiplies in int8 with int32 sums, reading
    a quarter of the fp32 weight's bytes. Elsewhere it is the plain product with the weight cast to the
    input's dtype, which any device runs. Buffers `weight` (int8, (out, in)), `scale` and `bias`.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.size(1), weight.size(0)
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self._packed = None  # (key, fbgemm packed weight), made on first use

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> Int8Linear:
        q, scale = quantize_rows(layer.weight)
        return cls(q, scale, None if layer.bias is None else layer.bias.detach().clone())

    def _fbgemm_weight(self):
        key = (self.weight.data_ptr(), self.weight._version, self.scale._version)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, _fbgemm_pack(self.weight, self.scale, self.bias))
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.device.type == "cpu"
            and enabled()
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and (reduce := _fbgemm_reduce_range()) is not None
        ):
            return torch.ops.quantized.linear_dynamic(x, self._fbgemm_weight(), reduce)
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def is_int8(model: nn.Module) -> bool:
    """Whether the model holds int8 weights (any Int8Linear)."""
    return any(isinstance(m, Int8Linear) for m in model.modules())


__all__ = ["Int8Linear", "is_int8", "quantize_rows"]
