"""Structured output: the tokens a row may take next under a JSON schema or a regular expression.

The grammar engine is llguidance: it reads the tokenizer's own tokenizer.json (a byte-level BPE, or a character
vocabulary), so a token that holds part of a UTF-8 character or several characters at once is allowed exactly
when the bytes it adds keep the text a prefix of something the grammar accepts. A `Constraint` follows one row:
`allowed()` is the mask of tokens it may take next (end of text once the text is complete), `consume(token)`
moves it on. docs/benchmarks.md has the cost per token, measured against llguidance's two peers.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import numpy as np
import torch

from .errors import OptionError

ANY_JSON_OBJECT = '{"type": "object"}'
# compact JSON: a model that may put whitespace anywhere can fill its whole budget with it
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise OptionError("structured output needs llguidance: pip install 'gptforge[structured]'") from None
    return llguidance


@functools.lru_cache(maxsize=8)
def _grammar_tokenizer(spec: str, vocab_size: int, eos_id: int):
    return _llguidance().LLTokenizer(spec, n_vocab=vocab_size, eos_token=eos_id)


def schema_text(value: str | dict) -> str:
    """A JSON schema from a dict, a JSON text or a .json file's path (what --json-schema takes)."""
    if isinstance(value, dict):
        return json.dumps(value)
    text = value.strip()
    if not text.startswith("{") and Path(text).suffix == ".json":
        try:
            text = Path(text).read_text(encoding="utf-8")
        except OSError as e:
            raise OptionError(f"--json-schema {value}: cannot read it ({e.strerror or e})") from None
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise OptionError(f"json_schema: not valid JSON ({e}); give a schema as JSON text or a .json file") from None
    if not isinstance(schema, dict):
        raise OptionError('json_schema: a JSON schema is an object, e.g. {"type": "object"}')
    return json.dumps(schema)


def choice_regex(choices: list[str]) -> str:
    """A regular expression that matches exactly one of `choices` (vLLM's guided_choice)."""
    return "(" + "|".join(re.escape(c) for c in choices) + ")"


class Constraint:
    """One row's grammar state: which tokens may come next, and the tokens taken so far."""

    def __init__(self, matcher, vocab_size: int, device: torch.device | str = "cpu"):
        self.matcher, self.vocab_size, self.device = matcher, vocab_size, device

    def allowed(self) -> torch.Tensor:
        """A (vocab_size,) bool mask of the tokens that keep the text inside the grammar."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool)
        return torch.from_numpy(mask).to(self.device)

    def fresh(self, device: torch.device | str | None = None) -> "Constraint":
        """The same grammar at its start, for another row (a copy of the matcher: the grammar is not compiled
        again)."""
        return Constraint(self.matcher.deep_copy(), self.vocab_size, self.device if device is None else device)

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"token {token} is outside the grammar: {self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """The text is a whole match: nothing but end of text may follow."""
        return self.matcher.is_stopped()


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())[:300]


def make_constraint(
    tokenizer,
    vocab_size: int,
    *,
    json_schema: str | None = None,
    regex: str | None = None,
    device: torch.device | str = "cpu",
) -> Constraint | None:
    """A constraint for one row from the options (None when there is none); a bad schema or regex is one line."""
    if json_schema is None and regex is None:
        return None
    if json_schema is not None and regex is not None:
        raise OptionError("give one of json_schema and regex, not both")
    lib = _llguidance()
    hf = getattr(tokenizer, "hf_tokenizer", None)
    if hf is None:
        raise OptionError("structured output needs the model's tokenizer (a tokenizer.json)")
    grammar_tokenizer = _grammar_tokenizer(hf.to_str(), vocab_size, tokenizer.eos_id)
    what = "json_schema" if json_schema is not None else "regex"
    schema = json.loads(schema_text(json_schema)) if json_schema is not None else None
    try:
        if schema is not None:
            schema.setdefault("x-guidance", _COMPACT)
            grammar = lib.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        else:
            grammar = lib.LLMatcher.grammar_from_regex(regex)
        matcher = lib.LLMatcher(grammar_tokenizer, grammar)
    except (ValueError, TypeError, RuntimeError) as e:  # the grammar engine's own words for a bad schema or regex
        raise OptionError(f"{what}: {_one_line(str(e)) or type(e).__name__}") from None
    if matcher.is_error():
        raise OptionError(f"{what}: {_one_line(matcher.get_error())}")
    return Constraint(matcher, vocab_size, device)


__all__ = ["ANY_JSON_OBJECT", "Constraint", "choice_regex", "make_constraint", "schema_text"]
