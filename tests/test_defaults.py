"""Each default is written once: every flag made from an options dataclass has its field's default, and the
flags written by hand have the default of the library function they call."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest

from gptforge.cli import build_parser
from gptforge.options import (
    DEFAULT_VOCAB_SIZE,
    ClassifyOptions,
    EvalOptions,
    InstructOptions,
    LoRAOptions,
    MemorizationOptions,
    PrepareOptions,
    SamplingOptions,
    ServeOptions,
    TrainConfig,
)

COMMANDS = {
    ("generate",): [SamplingOptions],
    ("eval",): [EvalOptions, MemorizationOptions],
    ("serve",): [ServeOptions],
    ("train",): [TrainConfig, LoRAOptions, InstructOptions],
    ("classify", "train"): [ClassifyOptions],
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
    checked = 0
    for cls in COMMANDS[path]:
        for f in dataclasses.fields(cls):
            if f.name not in defaults:
                continue  # a field the command sets itself (e.g. train's --out is its own)
            expected = f.default_factory() if f.default is dataclasses.MISSING else f.default
            assert defaults[f.name] == expected, f"{' '.join(path)} --{f.name}: {defaults[f.name]!r} != {expected!r}"
            checked += 1
    assert checked >= 5


def test_hand_written_flags_have_the_librarys_defaults():
    from gptforge.data.shards import prepare
    from gptforge.tokenizer import train_tokenizer

    parser = build_parser()
    tokenizer = _defaults(_command(parser, ("tokenizer", "train")))
    assert (
        tokenizer["vocab_size"]
        == DEFAULT_VOCAB_SIZE
        == inspect.signature(train_tokenizer).parameters["vocab_size"].default
    )
    signature = inspect.signature(prepare).parameters
    for name, value in _defaults(_command(parser, ("prepare",))).items():
        if name in signature and signature[name].default is not inspect.Parameter.empty and name != "force":
            assert value == signature[name].default, f"prepare --{name}: {value!r} != {signature[name].default!r}"
