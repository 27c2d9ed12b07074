"""Command-line flags made from an options dataclass: one --option per field, its help, choices and default
from the field, so the CLI, the Python keywords and the server's fields share their names and defaults."""

from __future__ import annotations

import argparse
import dataclasses

from .base import parse_duration
from .train import TRAIN_GROUPS


def add_dataclass_options(parser: argparse.ArgumentParser, cls, groups: dict | None = None) -> None:
    """One --option per field of an options dataclass (help, choices and flag name from the field), so the
    CLI and the Python API share their names and defaults. `groups` maps group titles to argument groups;
    a field goes to the group options.TRAIN_GROUPS names for it. The help ends with the default, once."""
    group_of = {name: title for title, names in TRAIN_GROUPS.items() for name in names}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        flag = "--" + (meta.get("flag") or f.name).replace("_", "-")
        where = (groups or {}).get(group_of.get(f.name), parser)
        if f.type in ("bool", bool, "bool | None"):
            action = where.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=meta.get("help", "")
            )
            shown = None if f.default is None else "on" if f.default else "off"
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
            if f.name == "max_time":
                kind = _argparse_type(parse_duration)
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            action = where.add_argument(
                flag, dest=f.name, type=kind, default=default, choices=meta.get("choices"), help=meta.get("help", "")
            )
            shown = default if default != [] else None
        if shown is not None and shown != "" and "default" not in action.help:
            action.help += f" (default: {shown})"


def _argparse_type(parse):
    """`parse` as an argparse type whose error message is shown (argparse hides a ValueError's own words)."""

    def kind(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    kind.__name__ = parse.__name__
    return kind


def option_values(args: argparse.Namespace, cls) -> dict:
    """The fields of an options dataclass as the parsed arguments give them."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
