"""What the benchmarks print about the machine they ran on, and the switch that runs them at a chosen
instruction-set level.

`--isa avx2` on a machine with AVX-512 emulates an AVX2-only processor for every engine in the run:
gptforge's kernel is built for x86-64-v3 (GPTFORGE_ISA) and torch, oneDNN, MKL, fbgemm and CTranslate2 are
told to stop at AVX2 by their own variables. They are read when each library loads, so `use_isa` starts the
script again with them set (its worker processes inherit them). `--isa native` clears them all.
"""

from __future__ import annotations

import os
import platform
import sys

ISA_VARIABLES = {  # variable: its value for an emulated AVX2 processor
    "GPTFORGE_ISA": "avx2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
    "CT2_FORCE_CPU_ISA": "AVX2",
}
MARK = "GPTFORGE_BENCH_ISA"  # set once the script runs under the chosen level's variables


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def add_isa_argument(parser) -> None:
    parser.add_argument(
        "--isa",
        choices=("native", "avx2"),
        default=None,
        help="run every engine at this instruction-set level (avx2: emulated on a newer CPU; "
        "default: as the environment says)",
    )


def use_isa(level: str | None) -> None:
    """Run this script at `level` (None: leave the environment alone): sets the variables and starts it again
    unless they are already in force."""
    if level is None or os.environ.get(MARK) == level:
        return
    env = {k: v for k, v in os.environ.items() if k not in ISA_VARIABLES}
    if level == "avx2":
        env.update(ISA_VARIABLES)
    env[MARK] = level
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def level_line() -> str:
    """The level this run is at, and how it got there: native, or emulated with which variables."""
    set_ = {k: os.environ[k] for k in ISA_VARIABLES if k in os.environ}
    if not set_:
        return "instruction set: native (no ISA variables set)"
    emulated = "emulated " if os.environ.get("GPTFORGE_ISA", "native") != "native" else ""
    return (
        f"instruction set: {emulated}{os.environ.get('GPTFORGE_ISA', 'native')} ("
        + ", ".join(f"{k}={v}" for k, v in set_.items())
        + ")"
    )


def paths_line() -> str:
    """The CPU paths in force (gptforge's measured choices, or their override), one line."""
    from gptforge import calibrate
    from gptforge.inference import fastdecode

    calibrate.MEASURES.setdefault("steps", fastdecode.measure_steps)  # as importing fastdecode did
    values = {name: calibrate.decision(name) for name in calibrate.DEFAULTS}
    override = os.environ.get(calibrate.OVERRIDE)
    return (
        f"paths: {', '.join(f'{k}={v}' for k, v in values.items())} ("
        + (f"{calibrate.OVERRIDE}={override}" if override else "measured on this machine")
        + ")"
    )
