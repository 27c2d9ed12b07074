"""Which CPU path runs, chosen by measuring them on this machine once and remembering the answer.

Seven decisions, six between paths that give the same numbers up to rounding:

- `onednn`: whether fp32 products (training, prompts) go through oneDNN rather than torch's BLAS (kernels.py);
- `bf16`: whether a training run at `--precision auto` multiplies its fp32 matrices with bf16 inputs (fp32 sums,
  fp32 everywhere else: kernels.py's `bf16_products`), because this processor does that much faster (AMX,
  AVX-512 BF16). The one decision that changes the numbers (a product's inputs keep 8 bits of mantissa, not 24,
  like TF32 on a GPU), so it is taken only for a gain of `BF16_GAIN` or more;
- `gelu`: whether GPT-2's tanh GELU runs in C (gelu.py) rather than torch's, in training and prompts;
- `prefetch`: whether the decoding kernel prefetches its weights in software for every few-row product, or
  leaves one to three rows to the hardware's prefetcher (inference/native.py);
- `fp32_rows`, `int8_rows`: up to how many sequences a decoding step runs in C (fastdecode.py) rather than
  through the model's torch forward, for fp32 and for int8 weights (0: never);
- `threads`: how many threads the C step runs on.

A decision is measured the first time it is wanted (a fraction of a second to a few seconds, on shapes like
gpt2's: the products a training step multiplies, one row's products and whole decoding steps of a two-block
gpt2-wide model at each row count), the other path chosen over the default (torch's products and GELU; prefetch in
every tile; the C step; torch's threads) only where its best time beats the default's by more than the noise of the
timings (`beats`). It is kept in a JSON file beside the
compiled kernel (`cpu.cache_dir()`), one per processor, instruction-set level (`GPTFORGE_ISA`), torch
version, CPU count and torch's own ISA variables; a file that cannot be read is measured again.
`GPTFORGE_CALIBRATION` overrides: "off" measures nothing and takes the defaults below, or name=value pairs
("onednn=0,fp32_rows=8,int8_rows=3,threads=2") fix those decisions and leave the others measured.
`gptforge info` shows them; `gptforge info --calibrate` measures them again.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import cpu
from .errors import OptionError
from .fsio import write_text

OVERRIDE = "GPTFORGE_CALIBRATION"
# what is used where nothing can be measured ("off", or no kernel): torch's fp32 products, the C step at every row
# count it takes, as many threads as torch uses
DEFAULTS = {
    "onednn": False,
    "bf16": False,
    "gelu": False,
    "prefetch": True,
    "fp32_rows": cpu.MAX_ROWS,
    "int8_rows": cpu.MAX_ROWS,
    "threads": 0,
}
# the variables that change torch's own speed: a measurement holds only under the same values
TORCH_ISA = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "FBGEMM_ENABLE_INSTRUCTIONS",
    "OMP_NUM_THREADS",
)


SWITCHES = ("onednn", "bf16", "gelu", "prefetch")  # the yes/no decisions
BF16_GAIN = 1.25  # bf16 products are taken only where they run at least this many times as fast as fp32's


def _valid(name: str, value) -> bool:
    if name in SWITCHES:
        return isinstance(value, bool)
    top = cpu.MAX_ROWS if name.endswith("_rows") else 4096
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= top


def overrides() -> dict | None:
    """The decisions `GPTFORGE_CALIBRATION` fixes; None for "off" (nothing measured, DEFAULTS used)."""
    return _parse(os.environ.get(OVERRIDE, ""))


@functools.lru_cache(maxsize=16)
def _parse(text: str) -> dict | None:
    text = text.strip().lower()
    if text in ("off", "0", "no", "false"):
        return None
    fixed = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = (part.strip() for part in pair.partition("="))
        flags = {
            "1": True,
            "on": True,
            "yes": True,
            "true": True,
            "0": False,
            "off": False,
            "no": False,
            "false": False,
        }
        try:
            parsed = flags.get(value) if name in SWITCHES else int(value)
        except ValueError:
            parsed = None
        if name not in DEFAULTS or not _valid(name, parsed):
            raise OptionError(
                f"{OVERRIDE}: {pair!r} is not one of onednn=0|1, bf16=0|1, gelu=0|1, prefetch=0|1, "
                f"fp32_rows=0-{cpu.MAX_ROWS}, int8_rows=0-{cpu.MAX_ROWS}, threads=N (0: torch's), comma-separated, "
                "or off"
            )
        fixed[name] = parsed
    return fixed


def path() -> Path:
    """This machine's calibration file: per kernel build (processor, level, source) and torch set-up. Asked at every
    product (kernels.onednn), so it is remembered per value of the variables it depends on."""
    env = os.environ
    return _path_of(
        env.get(cpu.ISA, ""),
        env.get("GPTFORGE_CACHE", ""),
        env.get("HOME", ""),
        tuple(env.get(k, "") for k in TORCH_ISA),
    )


@functools.lru_cache(maxsize=16)
def _path_of(isa: str, cache: str, home: str, torch_isa: tuple) -> Path:
    return _path(cpu.isa(), str(cpu.cache_dir()), torch_isa)


@functools.lru_cache(maxsize=16)
def _path(level: str, folder: str, torch_isa: tuple) -> Path:
    parts = [
        cpu.build_key(level),
        cpu.build_key(level, cpu.GELU_SOURCE),
        torch.__version__,
        str(os.cpu_count()),
        *torch_isa,
    ]
    return Path(folder) / f"calibration-{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:16]}.json"


def load() -> dict:
    """The stored file's contents ({"decisions": {...}, ...}); an empty one where it is missing or unreadable,
    or any decision in it is malformed (so that it is measured again)."""
    try:
        data = json.loads(path().read_text())
        decisions = data["decisions"]
        if isinstance(decisions, dict) and all(n in DEFAULTS and _valid(n, v) for n, v in decisions.items()):
            return data
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return {"decisions": {}, "timings": {}}


def _store(data: dict) -> None:
    data.update(
        processor=cpu.cpu_info("model name") or platform.processor() or platform.machine(),
        load=round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None,
        cpus=os.cpu_count(),
        isa=cpu.isa(),
        measured=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    try:
        path().parent.mkdir(parents=True, exist_ok=True)
        write_text(path(), json.dumps(data, indent=1, sort_keys=True) + "\n")
    except OSError:
        pass  # a read-only cache: measured again next time


def timings(runs: dict[str, Callable[[], object]], repeats: int = 5) -> dict[str, list[float]]:
    """Each run's `repeats` timed calls (after one untimed call each), sorted, taken in turn so that a busy
    spell of the machine falls on all of them alike."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t) for name, t in times.items()}


def beats(times: dict[str, list[float]], other: str, default: str) -> bool:
    """Whether `other`'s best time beats `default`'s by more than the noise: 3%, or the gap between either's
    two best times where that is wider (a busy machine keeps the default rather than a chance winner)."""
    noise = max([0.03] + [(t[1] - t[0]) / t[0] for t in (times[other], times[default]) if len(t) > 1])
    return times[other][0] < times[default][0] * (1 - noise)


def best_ms(times: dict[str, list[float]]) -> dict[str, float]:
    """Each run's best time in milliseconds (what the file keeps of the timings)."""
    return {name: round(t[0] * 1e3, 3) for name, t in times.items()}


def _linear_products(mm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], tuple]:
    """The three products of a training step's linear layer at gpt2's width (forward, input gradient, weight
    gradient; 256 tokens), each done by `mm(a, b)` (a @ b)."""
    g = torch.Generator().manual_seed(0)
    x, w, grad = (torch.randn(*shape, generator=g) for shape in ((256, 768), (3072, 768), (256, 3072)))
    return lambda: (mm(x, w.t()), mm(grad, w), mm(grad.t(), x))


def compare_products(fast: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[dict, dict]:
    """The `onednn` decision: `fast(a, b)` (a @ b through oneDNN) against torch's a @ b on a linear layer's
    products."""
    t = timings({"torch": _linear_products(torch.matmul), "onednn": _linear_products(fast)}, 3)
    return {"onednn": beats(t, "onednn", "torch")}, {"products_ms": best_ms(t)}


def compare_bf16(bf16: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[dict, dict]:
    """The `bf16` decision: `bf16(a, b)` (a @ b from bf16-rounded inputs) against torch's fp32 a @ b on a linear
    layer's products; taken where it is `BF16_GAIN` times as fast and its results are fp32's up to bf16's
    rounding (a build that did something else would be refused)."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, 256, generator=g), torch.randn(256, 64, generator=g)
    exact = a @ b
    close = bool(((bf16(a, b) - exact).abs().max() <= 2**-6 * exact.abs().max()).item())
    t = timings({"fp32": _linear_products(torch.matmul), "bf16": _linear_products(bf16)}, 5)  # 0.1 s
    faster = beats(t, "bf16", "fp32") and t["bf16"][0] * BF16_GAIN <= t["fp32"][0]
    return {"bf16": close and faster}, {"bf16_products_ms": best_ms(t)}


# group of decisions -> its measurement (set by the modules that own the paths, which import this one)
MEASURES: dict[str, Callable[[], tuple[dict, dict]]] = {}
GROUPS = {
    "onednn": "products",
    "bf16": "bf16",
    "gelu": "gelu",
    "prefetch": "prefetch",
    "fp32_rows": "steps",
    "int8_rows": "steps",
    "threads": "steps",
}


def decision(name: str):
    """The decision `name` (see the module's docstring): overridden, stored, or measured now and stored."""
    fixed = overrides()
    if fixed is None:
        return DEFAULTS[name]
    return fixed[name] if name in fixed else _stored(name, path())


@functools.cache
def _stored(name: str, file: Path):
    data = load()
    measure = MEASURES.get(GROUPS[name])
    if name not in data["decisions"] and measure is not None:
        decisions, timings = measure()
        data = load()  # another process may have stored other groups meanwhile
        data["decisions"].update(decisions)
        data.setdefault("timings", {}).update(timings)
        _store(data)
    return data["decisions"].get(name, DEFAULTS[name])


def forget() -> None:
    """Drop what this process remembers of the stored decisions (after the file or the environment changed)."""
    _stored.cache_clear()


def measure_all() -> dict:
    """Measure every decision again (ignoring the stored file) and store them: `gptforge info --calibrate`."""
    data = {"decisions": {}, "timings": {}}
    for group in dict.fromkeys(GROUPS.values()):
        if group in MEASURES:
            decisions, timings = MEASURES[group]()
            data["decisions"].update(decisions)
            data["timings"].update(timings)
    _store(data)
    forget()
    return data


def describe() -> list[str]:
    """Lines for `gptforge info`: each decision and where it comes from (override, stored, not measured)."""
    fixed, stored = overrides(), load()
    lines = [f"calibration: {path()}"]
    for name, default in DEFAULTS.items():
        if fixed is None:
            lines.append(f"  {name} = {default} (default: {OVERRIDE}=off)")
        elif name in fixed:
            lines.append(f"  {name} = {fixed[name]} (from {OVERRIDE})")
        elif name in stored["decisions"]:
            lines.append(f"  {name} = {stored['decisions'][name]} (measured {stored.get('measured', '?')})")
        else:
            lines.append(f"  {name}: not measured yet (measured at first use, or by `gptforge info --calibrate`)")
    if (stored.get("load") or 0) > (stored.get("cpus") or 1):
        lines.append(
            f"  measured under load {stored['load']} on {stored['cpus']} CPUs: noisy timings keep the "
            "defaults; measure again on a quiet machine with `gptforge info --calibrate`"
        )
    return lines


__all__ = [
    "BF16_GAIN",
    "DEFAULTS",
    "MEASURES",
    "OVERRIDE",
    "beats",
    "best_ms",
    "compare_bf16",
    "compare_products",
    "decision",
    "describe",
    "forget",
    "load",
    "measure_all",
    "overrides",
    "path",
    "timings",
]
