"""GPT-2's tanh GELU for CPU training in C (csrc/gelu.c): forward and backward each one pass over memory.

torch's `F.gelu(x, approximate="tanh")` and its backward call tanh value by value on the CPU builds we measured
(three times the cost of its erf GELU on an Intel Xeon, at AVX2 and at AVX-512); the C file computes the same
function through an exp polynomial the compiler vectorises. It is built like the decoding kernel (cpu.build, into
the cache folder, per processor and level), checked against torch's on values from -12 to 12 the first time,
and used where calibrate.py's `gelu` decision measured it faster than torch's (kernels.gelu_tanh). Without a C
compiler or on other systems `available()` is False and torch's GELU is used.
"""

from __future__ import annotations

import ctypes
import functools
import warnings

import torch
import torch.nn.functional as F

from . import calibrate, cpu

SQRT_2_OVER_PI, CUBIC = 0.7978845608028654, 0.044715  # GPT-2's GELU: tanh(sqrt(2/pi) (x + 0.044715 x^3))


@functools.cache
def _load(level: str):
    if not (cpu.supported() and cpu.runs_here(level)):
        return None
    lib = cpu.load(cpu.GELU_SOURCE, level, "gptforge's GELU", "torch's")
    if lib is None:
        return None
    lib.gptforge_gelu.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
    lib.gptforge_gelu_backward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
    lib.gptforge_gelu.restype = lib.gptforge_gelu_backward.restype = None
    if not _agrees(lib):
        warnings.warn("gptforge's GELU disagrees with torch's on this machine; using torch's")
        return None
    return lib


def _library():
    return _load(cpu.isa())


def available() -> bool:
    """Whether the C GELU is built and checked here."""
    return _library() is not None


def _forward(lib, x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    lib.gptforge_gelu(x.data_ptr(), y.data_ptr(), x.numel())
    return y


def _backward(lib, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    dx = torch.empty_like(x)
    lib.gptforge_gelu_backward(x.data_ptr(), grad.data_ptr(), dx.data_ptr(), x.numel())
    return dx


def forward(x: torch.Tensor) -> torch.Tensor:
    """gelu(x), tanh form, for a contiguous fp32 CPU tensor (no autograd: kernels.gelu_tanh has it)."""
    return _forward(_library(), x)


def backward(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """grad * gelu'(x) for contiguous fp32 CPU tensors of one shape."""
    return _backward(_library(), x, grad)


def rounding(x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
    """How far two correct float32 evaluations of gelu(x) (or of g * gelu'(x)) may lie apart, value by value:
    a few units in the last place of the result, plus what torch's form loses where tanh(u) is near -1 (1 + tanh(u)
    and 1 - tanh(u)^2 keep only an absolute 2^-24 there), carried by x (forward) or by g x u'(x) (backward)."""
    eps = torch.finfo(torch.float32).eps
    carried = x.abs() if g is None else g.abs() * (1 + x.abs() * SQRT_2_OVER_PI * (1 + 3 * CUBIC * x * x))
    return 1e-6 + 4 * eps * carried


def _agrees(lib) -> bool:
    """Both passes give torch's values (tanh form) up to float rounding, over and beyond GELU's bend."""
    x = torch.linspace(-12, 12, 40001)
    g = torch.linspace(1, -1, 40001)
    ref, ref_dx = F.gelu(x, approximate="tanh"), torch.ops.aten.gelu_backward(g, x, approximate="tanh")
    forward_ok = ((_forward(lib, x) - ref).abs() <= rounding(x) + 4e-7 * ref.abs()).all()
    return bool(forward_ok and ((_backward(lib, x, g) - ref_dx).abs() <= rounding(x, g) + 4e-7 * ref_dx.abs()).all())


def measure() -> tuple[dict, dict]:
    """The `gelu` decision: this GELU's forward and backward against torch's on a `small` MLP's activations
    (16 x 128 tokens x 1,024), chosen where it beats torch's by more than the noise."""
    if not available():
        return {"gelu": False}, {}
    g = torch.Generator().manual_seed(0)
    x, grad = torch.randn(2048, 1024, generator=g), torch.randn(2048, 1024, generator=g)

    def torch_gelu():
        return torch.ops.aten.gelu_backward(grad, x, approximate="tanh"), F.gelu(x, approximate="tanh")

    t = calibrate.timings({"torch": torch_gelu, "c": lambda: (backward(x, grad), forward(x))}, 5)
    return {"gelu": calibrate.beats(t, "c", "torch")}, {"gelu_ms": calibrate.best_ms(t)}


calibrate.MEASURES["gelu"] = measure

__all__ = ["available", "backward", "forward", "measure", "rounding"]
