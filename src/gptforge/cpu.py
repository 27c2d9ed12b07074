"""The processor and how gptforge's C code is built for it: the instruction-set level asked for
(`GPTFORGE_ISA`), what this processor runs, the compiler flags, the cache folder for compiled kernels and
measurements, the key that says when either must be made again, and `build` / `load`, which compile a C source
into that folder once and open it. Nothing here checks or measures: inference/native.py checks the decoding
kernel, gelu.py the training GELU, and calibrate.py measures the paths.
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

from .errors import OptionError

SOURCE = Path(__file__).with_name("csrc") / "decode.c"  # the decoding kernel (inference/native.py)
GELU_SOURCE = SOURCE.with_name("gelu.c")  # the training GELU (gelu.py)
MAX_ROWS = 8  # a decoding batch's rows (measured at 1 and 8 by bench_gemv); longer inputs are prompts, for a GEMM
# reassociating the sums (not -ffast-math, which can change the whole process's float modes) lets the compiler
# vectorise them with several accumulators
FLAGS = ["-O3", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-fPIC"]
ISA = "GPTFORGE_ISA"  # the instruction-set level the kernel is built for: native (default), avx2 or avx512
# x86-64 levels: what the compiler may use, and the /proc/cpuinfo flags a processor needs to run the result
LEVELS = {
    "avx2": ("-march=x86-64-v3", ("avx2", "fma", "bmi2", "f16c", "movbe")),
    "avx512": ("-march=x86-64-v4", ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")),
}


def isa() -> str:
    """The level the environment asks for (`GPTFORGE_ISA`): "native", "avx2" or "avx512"."""
    level = os.environ.get(ISA, "native").strip().lower() or "native"
    if level != "native" and level not in LEVELS:
        raise OptionError(f"{ISA}={level!r} is not an instruction-set level: use native, avx2 or avx512")
    return level


def runs_here(level: str) -> bool:
    """Whether this processor can run code built for `level` (native always can)."""
    if level == "native":
        return True
    flags = set((cpu_info("flags") or "").split())
    return on_x86() and all(f in flags for f in LEVELS[level][1])


def march(level: str) -> list[str]:
    """The compiler's target flag for `level`: -march=native on x86, -mcpu=native on ARM."""
    if level != "native":
        return [LEVELS[level][0]]
    return ["-march=native"] if on_x86() else ["-mcpu=native"]


def cache_dir() -> Path:
    return Path(os.environ.get("GPTFORGE_CACHE") or Path.home() / ".cache" / "gptforge")


def on_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def supported() -> bool:
    """Whether the kernel is built on this system at all: Linux or macOS, on x86-64 or ARM64."""
    return platform.system() in ("Linux", "Darwin") and (on_x86() or platform.machine().lower() in ("aarch64", "arm64"))


def torch_openmp() -> Path | None:
    """The libgomp torch's wheel ships and has loaded (torch/lib on x86, torch.libs on ARM Linux); None where
    there is none to share (macOS, whose Apple clang has no -fopenmp, or a torch built otherwise)."""
    root = Path(torch.__file__).parent
    found = [root / "lib" / "libgomp.so.1", *sorted(root.parent.glob("torch.libs/libgomp*.so*"))]
    return next((lib for lib in found if lib.is_file()), None)


@functools.cache
def cpu_info(field: str) -> str | None:
    """The first processor's `field` in /proc/cpuinfo (e.g. "vendor_id", "flags"); None where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == field), None)


def _cpu_key() -> str:
    """What -march=native depends on: the processor's feature flags."""
    return cpu_info("flags") or cpu_info("Features") or f"{platform.machine()} {platform.processor()}"


def build_flags(level: str) -> list[str]:
    """The compiler flags for `level`; OpenMP only where torch has a libgomp to share."""
    return [*FLAGS, *march(level), *(["-fopenmp"] if torch_openmp() else [])]


def build_key(level: str, source: Path = SOURCE) -> str:
    """What the compiled library depends on: the source, the flags, torch's OpenMP runtime and the processor."""
    parts = [source.read_text(), *build_flags(level), str(torch_openmp()), _cpu_key(), level]
    return f"{level}-" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def library_path(source: Path, level: str) -> Path:
    """Where `build` puts the shared library of `source` at `level`."""
    return cache_dir() / f"{source.stem}-{build_key(level, source)}.so"


def build(source: Path, level: str) -> Path:
    """The shared library of the C file `source` at `level`, compiled unless cached (OSError without a compiler,
    CalledProcessError where it fails), linked against torch's OpenMP runtime so that both share one pool."""
    target = library_path(source, level)
    if target.is_file():
        return target
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) found")
    gomp = torch_openmp()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / f"{source.stem}.o", Path(tmp) / f"{source.stem}.so"
        run = functools.partial(subprocess.run, check=True, capture_output=True)
        run([compiler, *build_flags(level), "-c", str(source), "-o", str(obj)])
        run([compiler, "-shared", str(obj), *([str(gomp)] if gomp else []), "-o", str(lib)])
        os.replace(lib, target)  # atomic: another process building at the same time writes the same file
    return target


def load(source: Path, level: str, what: str, instead: str) -> ctypes.CDLL | None:
    """The library of `source` at `level`, built unless cached and opened; None, with one warning that `what`
    could not be built and `instead` is used, where there is no compiler or the build fails."""
    try:
        return ctypes.CDLL(str(build(source, level)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.decode(errors="replace").strip()[-300:] if isinstance(e, subprocess.CalledProcessError) else e
        warnings.warn(f"{what} could not be built ({detail}); using {instead}")
        return None


__all__ = [
    "FLAGS",
    "GELU_SOURCE",
    "ISA",
    "LEVELS",
    "MAX_ROWS",
    "SOURCE",
    "build",
    "build_flags",
    "build_key",
    "cache_dir",
    "cpu_info",
    "isa",
    "library_path",
    "load",
    "march",
    "on_x86",
    "runs_here",
    "supported",
    "torch_openmp",
]
