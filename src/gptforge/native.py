"""A small C kernel for decoding on x86-64 Linux, built on first use with the system's C compiler.

`gemv(x, pack(weight), bias)` is F.linear for 1 to 8 input rows with an fp32 (out, in) weight: the product a
decoding step runs for every layer, bound by reading the weights from memory. The packed copy lets the
kernel read them as one sequential stream, four output rows against up to four input rows at a time
(csrc/gemv.c); on the 2-core VMs we measure on it reads as fast as a plain sum of the same memory, a few
percent to a sixth faster than oneDNN's packed product at one row and a quarter faster at eight
(docs/benchmarks.md). It is compiled once per processor into the cache folder (`$GPTFORGE_CACHE`, else
`~/.cache/gptforge`) with `-march=native`, linked against the OpenMP runtime torch has loaded so that both
share one thread pool, and checked against F.linear before use. Without a C compiler, or on other systems,
`available()` is False and callers keep torch's products.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("csrc") / "gemv.c"
MAX_ROWS = 8  # a decoding batch's rows (measured at 1 and 8 by bench_gemv); longer inputs are prompts, for a GEMM
# reassociating the sums (not -ffast-math, which can change the whole process's float modes) lets the compiler
# vectorise them with several accumulators
FLAGS = ["-O3", "-march=native", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-fopenmp", "-fPIC"]


def cache_dir() -> Path:
    return Path(os.environ.get("GPTFORGE_CACHE") or Path.home() / ".cache" / "gptforge")


def _torch_openmp() -> Path | None:
    """The libgomp torch's wheel ships and has loaded (None: a torch built otherwise)."""
    lib = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    return lib if lib.is_file() else None


@functools.lru_cache(maxsize=None)
def cpu_info(field: str) -> str | None:
    """The first processor's `field` in /proc/cpuinfo (e.g. "vendor_id", "flags"); None where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == field), None)


def _cpu_key() -> str:
    """What -march=native depends on: the processor's feature flags."""
    return cpu_info("flags") or platform.processor()


def _build() -> Path:
    """The shared library for this source, compiler flags and processor, compiled unless cached."""
    gomp = _torch_openmp()
    if gomp is None:
        raise OSError("torch ships no libgomp.so.1")
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, str(gomp), _cpu_key()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"gemv-{key}.so"
    if target.is_file():
        return target
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) found")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / "gemv.o", Path(tmp) / "gemv.so"
        subprocess.run([compiler, *FLAGS, "-c", str(SOURCE), "-o", str(obj)], check=True, capture_output=True)
        subprocess.run([compiler, "-shared", str(obj), str(gomp), "-o", str(lib)], check=True, capture_output=True)
        os.replace(lib, target)  # atomic: another process building at the same time writes the same file
    return target


def on_x86_linux() -> bool:
    return platform.system() == "Linux" and platform.machine().lower() in ("x86_64", "amd64")


@functools.lru_cache(maxsize=1)
def _library():
    if not on_x86_linux():
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.decode(errors="replace").strip()[-300:] if isinstance(e, subprocess.CalledProcessError) else e
        warnings.warn(f"gptforge's decoding kernel could not be built ({detail}); using torch's products")
        return None
    fn = lib.gptforge_gemv
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3
    fn.restype = None
    if not _agrees(fn):
        warnings.warn("gptforge's decoding kernel disagrees with F.linear on this machine; using torch's products")
        return None
    return fn


VECTOR = 16  # floats per vector in the packed layout (W in csrc/gemv.c)


class Packed:
    """A weight in the kernel's layout (see csrc/gemv.c): tiles of four rows interleaved by VECTOR floats,
    zero-padded to whole tiles and vectors. `out` and `in_features` are the weight's own sizes."""

    def __init__(self, weight: torch.Tensor):
        out, inp = weight.shape
        self.out, self.in_features, self.width = out, inp, -(-inp // VECTOR) * VECTOR
        padded = torch.zeros(-(-out // 4) * 4, self.width)
        padded[:out, :inp] = weight.detach()
        self.data = padded.view(-1, 4, self.width // VECTOR, VECTOR).transpose(1, 2).contiguous()


def pack(weight: torch.Tensor) -> Packed:
    """`weight` (out, in), fp32 on the CPU, in the kernel's layout: as much memory again as the weight."""
    return Packed(weight)


def _call(fn, x: torch.Tensor, w: Packed, bias: torch.Tensor | None) -> torch.Tensor:
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    if w.width != w.in_features:  # the kernel reads whole vectors
        x = F.pad(x, (0, w.width - w.in_features))
    x = x.contiguous()
    y = torch.empty(*lead, w.out)
    fn(w.data.data_ptr(), x.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
       w.out, w.width, x.shape[0])
    return y


def _agrees(fn) -> bool:
    g = torch.Generator().manual_seed(0)
    for rows, out, inp in ((1, 37, 45), (3, 64, 128), (8, 130, 96), (5, 3, 16)):
        x, w, b = torch.randn(rows, inp, generator=g), torch.randn(out, inp, generator=g), torch.randn(out, generator=g)
        for bias in (b, None):
            if not torch.allclose(_call(fn, x, pack(w), bias), F.linear(x, w, bias), atol=1e-4, rtol=1e-4):
                return False
    return True


def available() -> bool:
    """Whether the kernel can be used in this process (built and checked; kernels.py also honours its switch)."""
    return _library() is not None


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` takes x times this weight: fp32 CPU tensors, at most MAX_ROWS rows, no gradients."""
    return (x.dtype == weight.dtype == torch.float32 and x.device.type == weight.device.type == "cpu"
            and 0 < x.numel() // max(x.shape[-1], 1) <= MAX_ROWS and not torch.is_grad_enabled() and available())


def gemv(x: torch.Tensor, weight: Packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) for a few fp32 rows (see `fits`), where `weight = pack(w)`; no autograd."""
    return _call(_library(), x, weight, bias if bias is None else bias.contiguous())


__all__ = ["MAX_ROWS", "Packed", "available", "cache_dir", "cpu_info", "fits", "gemv", "pack"]
