"""Small C kernels for decoding on x86-64 Linux, built on first use with the system's C compiler.

`gemv(x, pack(weight), bias)` is F.linear for 1 to 8 input rows with an (out, in) weight, fp32 or int8 with
one scale per output row (`pack_int8`): the product a decoding step runs for every layer, bound by reading
the weights from memory. The packed copy lets the kernel read them as one sequential stream, four output
rows against up to four input rows at a time (csrc/decode.c); on the 2-core VMs we measure on it reads as
fast as a plain sum of the same memory, a few percent to a sixth faster than oneDNN's packed product at one
row and a quarter faster at eight (docs/benchmarks.md). `step` runs a whole decoding step of a GPT-2 in one
call on such weights (fastdecode.py builds its arguments). The library is compiled once per processor into
the cache folder (`$GPTFORGE_CACHE`, else `~/.cache/gptforge`) with `-march=native`, linked against the
OpenMP runtime torch has loaded so that both share one thread pool, and checked against F.linear before
use. Without a C compiler, or on other systems, `available()` is False and callers keep torch's products.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
import os
import platform
import warnings

import torch
import torch.nn.functional as F

from .. import calibrate, cpu
from .int8 import quantize_rows


class Weight(ctypes.Structure):
    """csrc/decode.c's Weight: a packed weight as the C code sees it."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("out", ctypes.c_long),
        ("in_", ctypes.c_long),
    ]


class Layer(ctypes.Structure):
    """csrc/decode.c's Layer: one block's parameters and its KV cache."""

    _fields_ = [
        ("ln1_w", ctypes.c_void_p),
        ("ln1_b", ctypes.c_void_p),
        ("attn", Weight),
        ("attn_proj", Weight),
        ("ln2_w", ctypes.c_void_p),
        ("ln2_b", ctypes.c_void_p),
        ("fc", Weight),
        ("mlp_proj", Weight),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
    ]


class Model(ctypes.Structure):
    """csrc/decode.c's Model: the whole network for `step`."""

    _fields_ = [
        ("n_layer", ctypes.c_long),
        ("n_head", ctypes.c_long),
        ("n_embd", ctypes.c_long),
        ("mlp_width", ctypes.c_long),
        ("max_len", ctypes.c_long),
        ("eps", ctypes.c_float),
        ("act", ctypes.c_long),
        ("wte", ctypes.c_void_p),
        ("wpe", ctypes.c_void_p),
        ("lnf_w", ctypes.c_void_p),
        ("lnf_b", ctypes.c_void_p),
        ("head", Weight),
        ("layers", ctypes.POINTER(Layer)),
    ]


# model.py's activation names, as csrc/decode.c numbers them
ACTIVATIONS = {"gelu_new": 0, "gelu_pytorch_tanh": 0, "gelu_fast": 0, "gelu": 1, "relu": 2, "relu2": 3, "quick_gelu": 4}


def _library():
    """The kernel at the level the environment asks for (`cpu.isa()`), or None where it cannot be used."""
    return _load(cpu.isa())


@functools.cache
def _load(level: str):
    if not cpu.supported():
        return None
    if not cpu.runs_here(level):
        warnings.warn(f"{cpu.ISA}={level}: this processor cannot run it; using torch's products")
        return None
    lib = cpu.load(cpu.SOURCE, level, "gptforge's decoding kernel", "torch's products")
    if lib is None:
        return None
    if cpu.torch_openmp() is None:
        warnings.warn("gptforge's decoding kernel is built without OpenMP (torch ships no libgomp here): one thread")
    lib.gptforge_gemv.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 3
    lib.gptforge_gemv.restype = None
    lib.gptforge_step.argtypes = [
        ctypes.POINTER(Model),
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_long,
        ctypes.c_long,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    lib.gptforge_step.restype = ctypes.c_int
    lib.gptforge_vector_width.argtypes, lib.gptforge_vector_width.restype = [], ctypes.c_int
    lib.gptforge_set_prefetch.argtypes, lib.gptforge_set_prefetch.restype = [ctypes.c_int], None
    lib.vector_width = lib.gptforge_vector_width()  # read once: packing asks for it at every product
    if not _agrees(lib):
        warnings.warn("gptforge's decoding kernel disagrees with F.linear on this machine; using torch's products")
        return None
    return lib


HUGE_PAGE = 2 << 20


def _huge_pages_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An empty contiguous tensor in fresh memory that Linux is asked to back with 2 MB pages (transparent huge
    pages, where the system leaves them to madvise): a product streaming it then misses the TLB once per
    2 MB rather than once per 4 KB page. Small tensors, and other systems, get torch's own allocation."""
    size = math.prod(shape) * dtype.itemsize
    if size < 2 * HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE") or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(shape, dtype=dtype)
    # private, anonymous and untouched: the advice applies as the pages arrive
    memory = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer's note that the buffer is shared: it is ours alone
        raw = torch.frombuffer(memory, dtype=torch.uint8)  # keeps `memory` alive
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start : start + size].view(dtype).view(shape)


VECTOR = 16  # values per vector in the packed layout of AVX-512 and plain C builds (W in csrc/decode.c)


def vector_width(lib=None) -> int:
    """Values per vector in the packed layout the kernel built here reads (8 for AVX2, 4 for NEON, else VECTOR)."""
    lib = lib if lib is not None else _library()
    return lib.vector_width if lib is not None else VECTOR


class Packed:
    """A weight in the kernel's layout (see csrc/decode.c): tiles of four rows interleaved by VECTOR values,
    zero-padded to whole tiles and vectors; fp32, or int8 with `scale` (fp32, one per output row).
    `out` and `in_features` are the weight's own sizes, `width` the padded input size. `huge_pages=False` keeps
    it in torch's own allocation (for measuring what the 2 MB pages are worth)."""

    def __init__(
        self, weight: torch.Tensor, scale: torch.Tensor | None = None, huge_pages: bool = True, vector: int = 0
    ):
        out, inp = weight.shape
        vector = vector or vector_width()
        self.out, self.in_features, self.width = out, inp, -(-inp // vector) * vector
        padded = torch.zeros(-(-out // 4) * 4, self.width, dtype=weight.dtype)
        padded[:out, :inp] = weight.detach()
        tiles = padded.view(-1, 4, self.width // vector, vector).transpose(1, 2)
        self.data = (_huge_pages_empty if huge_pages else torch.empty)(tiles.shape, dtype=tiles.dtype).copy_(tiles)
        self.scale = None if scale is None else scale.detach().float().contiguous()

    def struct(self, bias: torch.Tensor | None) -> Weight:
        """The C view of this weight with `bias` (contiguous fp32, or None); the tensors must outlive it."""
        return Weight(
            self.data.data_ptr(),
            None if self.scale is None else self.scale.data_ptr(),
            None if bias is None else bias.data_ptr(),
            self.out,
            self.width,
        )


def pack(weight: torch.Tensor, huge_pages: bool = True, vector: int = 0) -> Packed:
    """`weight` (out, in), fp32 on the CPU, in the kernel's layout: as much memory again as the weight."""
    return Packed(weight.float(), huge_pages=huge_pages, vector=vector)


def pack_int8(weight: torch.Tensor, scale: torch.Tensor, vector: int = 0) -> Packed:
    """An int8 `weight` (out, in) that stands for `weight * scale[:, None]`, in the kernel's layout."""
    if weight.dtype != torch.int8:
        raise TypeError(f"pack_int8 takes an int8 weight, not {weight.dtype}")
    return Packed(weight, scale, vector=vector)


def _call(lib, x: torch.Tensor, w: Packed, bias: torch.Tensor | None) -> torch.Tensor:
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    if w.width != w.in_features:  # the kernel reads whole vectors
        x = F.pad(x, (0, w.width - w.in_features))
    x = x.contiguous()
    y = torch.empty(*lead, w.out)
    lib.gptforge_gemv(
        w.data.data_ptr(),
        None if w.scale is None else w.scale.data_ptr(),
        x.data_ptr(),
        None if bias is None else bias.data_ptr(),
        y.data_ptr(),
        w.out,
        w.width,
        x.shape[0],
    )
    return y


def rounding_bound(x: torch.Tensor, w: torch.Tensor, extra: int = 3) -> torch.Tensor:
    """How far two fp32 evaluations of x @ w.T (plus a bias, a scale) may differ by rounding alone, in any
    order of summation: each is within gamma(n) * sum_i |x_i w_i| of the exact sum, gamma(n) = n u / (1 - n u)
    with u = 2^-24, n the sum's length and `extra` roundings besides (scaling, adding the bias, the
    reference's own q * scale); twice that for the two. Shape (rows, out), in float64."""
    n = x.shape[-1] + extra
    u = torch.finfo(torch.float32).eps / 2
    return 2 * (n * u / (1 - n * u)) * (x.double().abs() @ w.double().abs().T)


def _agrees(lib) -> bool:
    g, vector = torch.Generator().manual_seed(0), vector_width(lib)
    for rows, out, inp in ((1, 37, 45), (3, 64, 128), (8, 130, 96), (5, 3, 16)):
        x, w, b = torch.randn(rows, inp, generator=g), torch.randn(out, inp, generator=g), torch.randn(out, generator=g)
        q = torch.randint(-127, 128, (out, inp), generator=g, dtype=torch.int8)
        scale = torch.rand(out, generator=g) / 64
        wq = q.float() * scale[:, None]
        for bias in (b, None):
            fp32, int8 = pack(w, vector=vector), pack_int8(q, scale, vector=vector)
            for ours, weight in ((_call(lib, x, fp32, bias), w), (_call(lib, x, int8, bias), wq)):
                if not ((ours - F.linear(x, weight, bias)).abs() <= rounding_bound(x, weight)).all():
                    return False
    return True


def describe() -> list[str]:
    """Lines for `gptforge info`: the processor, the instruction-set level asked for and those it runs, the
    kernel's library (building it if needed)."""
    name = cpu.cpu_info("model name") or platform.processor() or "unknown processor"
    runs = ", ".join(level for level in cpu.LEVELS if cpu.runs_here(level)) or "none of " + ", ".join(cpu.LEVELS)
    level = cpu.isa()
    lines = [
        f"processor: {name} ({platform.machine()}, {os.cpu_count()} CPUs)",
        f"instruction set: {level} ({cpu.ISA}; this processor runs native, {runs})",
    ]
    if not available():
        return [*lines, "decoding kernel: not available here (torch's products are used)"]
    threads = "one thread (no OpenMP)" if cpu.torch_openmp() is None else "OpenMP shared with torch"
    return [*lines, f"decoding kernel: {cpu.library_path(cpu.SOURCE, level)} ({threads})"]


def set_prefetch(every_tile: bool) -> None:
    """Whether every product tile prefetches its weights in software, or only tiles of four input rows
    (csrc/decode.c); the calibration's `prefetch` decides (calibrate.py), the callers that run products set it."""
    lib = _library()
    if lib is not None:
        lib.gptforge_set_prefetch(int(every_tile))


def measure_prefetch() -> tuple[dict, dict]:
    """The `prefetch` decision: one row times the products of two gpt2-wide blocks, fp32 and int8 (71 MB: more than
    a core's caches hold), with software prefetch in every tile ("on", the default) against only in tiles of four
    rows ("off"), which the hardware prefetcher serves alone on some processors."""
    lib = _library()
    if lib is None:
        return {}, {}
    g = torch.Generator().manual_seed(0)
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 2
    weights = [torch.randn(o, i, generator=g) / 30 for o, i in shapes]
    packed = [pack(w) for w in weights] + [pack_int8(*quantize_rows(w)) for w in weights]
    x = {i: torch.randn(1, i, generator=g) for i in (768, 3072)}

    def products(every_tile: bool):
        def run():
            lib.gptforge_set_prefetch(int(every_tile))
            for w in packed:
                _call(lib, x[w.in_features], w, None)

        return run

    times = calibrate.timings({"on": products(True), "off": products(False)})
    on = not calibrate.beats(times, "off", "on")
    lib.gptforge_set_prefetch(int(on))
    return {"prefetch": on}, {"prefetch_ms": calibrate.best_ms(times)}


calibrate.MEASURES["prefetch"] = measure_prefetch


def available() -> bool:
    """Whether the kernel can be used in this process (built and checked; kernels.py also honours its switch)."""
    return _library() is not None


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` takes x times this weight: fp32 CPU tensors, at most cpu.MAX_ROWS rows, no gradients."""
    return (
        x.dtype == weight.dtype == torch.float32
        and x.device.type == weight.device.type == "cpu"
        and 0 < x.numel() // max(x.shape[-1], 1) <= cpu.MAX_ROWS
        and not torch.is_grad_enabled()
        and available()
    )


def gemv(x: torch.Tensor, weight: Packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) for a few fp32 rows (see `fits`), where `weight = pack(w)` (or `pack_int8`); no
    autograd."""
    return _call(_library(), x, weight, bias if bias is None else bias.contiguous())


def step(
    model: Model, ids: torch.Tensor, pos: torch.Tensor, past: int, visible: torch.Tensor | None, logits: torch.Tensor
) -> None:
    """csrc/decode.c's gptforge_step: one token for each of ids' rows (int64, contiguous; `pos` likewise), the
    cache holding `past` positions; `visible` (rows x past+1 bool, contiguous) or None; logits (rows x
    vocab fp32) are written."""
    if _library().gptforge_step(
        ctypes.byref(model),
        ids.data_ptr(),
        pos.data_ptr(),
        ids.numel(),
        past,
        None if visible is None else visible.data_ptr(),
        logits.data_ptr(),
    ):
        raise MemoryError("gptforge's decoding step could not allocate its buffers")


__all__ = [
    "ACTIVATIONS",
    "Layer",
    "Model",
    "Packed",
    "Weight",
    "available",
    "describe",
    "fits",
    "gemv",
    "pack",
    "pack_int8",
    "rounding_bound",
    "set_prefetch",
    "step",
]
