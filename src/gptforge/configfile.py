"""Options from a file: `gptforge train --config run.yaml` (or .json), with the flags' own names.

Precedence, lowest first: the defaults, the file, the flags given on the command line. Which flags were
given is found by parsing the command line again with every default suppressed, so a flag given with its
default value still wins over the file.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .errors import NotFoundError, OptionError


def read_config_file(path: str) -> dict:
    """The options of a YAML or JSON file: a mapping of flag names (`lr` or `--lr`, `max-time` or `max_time`)
    to values. A `run_config.json` written by a run is read from its "options"."""
    file = Path(path)
    if not file.is_file():
        raise NotFoundError(f"--config {path}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise OptionError(
            f"--config {path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None
    if file.suffix.lower() in (".yaml", ".yml"):
        data = _yaml(text, path)
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise OptionError(f"--config {path}: cannot be parsed ({str(e).splitlines()[0][:200]})") from None
    if isinstance(data, dict) and isinstance(data.get("options"), dict):
        data = data["options"]
    if not isinstance(data, dict):
        raise OptionError(f"--config {path}: must hold a mapping of option names to values, not {type(data).__name__}")
    return data


def _yaml(text: str, path: str):
    try:
        import yaml
    except ImportError:
        raise OptionError(
            f"--config {path}: reading YAML needs PyYAML (pip install pyyaml), or write it as JSON"
        ) from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise OptionError(f"--config {path}: {where}not valid YAML ({what})") from None


def given_on_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations that `argv` sets explicitly (not by default)."""
    saved = [(a, a.default) for a in parser._actions]
    for action, _ in saved:
        action.default = argparse.SUPPRESS
    try:
        given, _ = parser.parse_known_args(argv, argparse.Namespace())
    finally:
        for action, default in saved:
            action.default = default
    return {k for k in vars(given) if k not in parser._defaults}


def _value(action: argparse.Action, value, where: str, negated: bool = False):
    """A value from the file as the flag would have made it (types, choices, lists). `negated`: the file
    named a switch by a flag that turns it off (`no-overwrite: true` means overwrite off, as does
    `overwrite: false`)."""
    flag = action.option_strings[-1] if action.option_strings else action.dest
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise OptionError(f"{where}: {flag} must be true or false, not {value!r}")
        return value != negated
    many = isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+")
    values = value if isinstance(value, list) else [value]
    if not many and isinstance(value, list):
        raise OptionError(f"{where}: {flag} takes one value, not a list")
    out = []
    for v in values:
        if isinstance(v, (dict, list)) or (isinstance(v, bool) and action.type is None):
            raise OptionError(f"{where}: {flag} {v!r} is not a valid value")
        if isinstance(v, float) and not math.isfinite(v):  # YAML's .nan and .inf, JSON's NaN
            raise OptionError(f"{where}: {flag} {v!r}: not a number an option can take")
        if not isinstance(v, str):  # YAML's 1984 or 0.1 for a flag that reads text: as typed on the command line
            v = str(v)
        if action.type is not None:
            try:
                v = action.type(v)
            except argparse.ArgumentTypeError as e:  # the flag's own message (it names the flag)
                raise OptionError(f"{where}: {e}") from None
            except (TypeError, ValueError):
                raise OptionError(f"{where}: {flag} {v!r} is not a valid value") from None
        if action.choices is not None and v not in action.choices:
            raise OptionError(f"{where}: {flag} {v!r}: choose from {', '.join(map(str, action.choices))}")
        out.append(v)
    return out if many else out[0]


def _action_of(by_name: dict, key: str, value, where: str) -> tuple:
    """(action, negated, value) of a file's key: a flag's name, or another tool's (aliases.py: `output_dir`,
    `num_train_epochs`, `fp16: true`); (None, False, None) for a key that asks for what gptforge always does.
    Anything else is refused in one line."""
    from .aliases import ALWAYS, SAME_WHEN, alias_of, no_equivalent, suggestion

    name = key.lstrip("-").replace("-", "_")
    if name in by_name:
        return (*by_name[name], value)
    if name in ALWAYS or (name in SAME_WHEN and value == SAME_WHEN[name]):
        return None, False, None
    target = alias_of(name, {a.dest for a, _ in by_name.values()})
    if target is not None:
        action = next(a for a, off in by_name.values() if a.dest == target[0] and not off)
        return action, False, (value if target[1] is None else target[1] if value else None)
    error = no_equivalent(name, lambda n: f"{where}: {key!r}")
    if error is not None:
        raise error
    hint = suggestion(name, [n for n in by_name if not n.startswith("no_")])
    raise OptionError(f"{where}: unknown option {key!r}{hint or '; see the flags of --help'}")


def apply_config_file(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str], path: str) -> dict:
    """Fill `args` from the file at `path` wherever the command line did not set the option; returns the
    values taken from the file. Unknown names are an error that names them."""
    data = read_config_file(path)
    by_name = {}
    for action in parser._actions:
        if action.dest in ("help", "config") or action.dest == argparse.SUPPRESS:
            continue
        by_name.setdefault(action.dest, (action, False))
        for s in action.option_strings:  # --no-x of a switch, and store_false flags (--greedy), say "off"
            off = isinstance(action, argparse._StoreFalseAction) or (
                isinstance(action, argparse.BooleanOptionalAction) and s.startswith("--no-")
            )
            by_name[s.lstrip("-").replace("-", "_")] = (action, off)
    given = given_on_command_line(parser, argv)
    taken = {}
    for key, value in data.items():
        action, negated, value = _action_of(by_name, str(key), value, f"--config {path}")
        if action is not None and action.dest not in given and value is not None:  # null means "the default"
            taken[action.dest] = _value(action, value, f"--config {path}", negated)
            setattr(args, action.dest, taken[action.dest])
    return taken


__all__ = ["apply_config_file", "given_on_command_line", "read_config_file"]
