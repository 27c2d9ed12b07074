"""Sampling options: SamplingOptions, with the meaning each has in transformers' generate."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from ..errors import OptionError
from .base import (
    MAX_NEW_TOKENS,
    is_number,
    opt,
    refuse_unknown,
)


def parse_logit_bias(text: str) -> dict:
    """`--logit-bias`: 'ID:BIAS,ID:BIAS' or a JSON object of token ids to biases; the values are checked by
    SamplingOptions.validate."""
    text = text.strip()
    try:
        pairs = json.loads(text).items() if text.startswith("{") else [p.split(":") for p in text.split(",") if p]
        return {int(k): float(v) for k, v in pairs}
    except (ValueError, TypeError, AttributeError):
        error = OptionError(f"logit_bias={text!r}: write it as 'ID:BIAS,ID:BIAS' (e.g. '50256:-100') or a JSON object")
        error.param = "logit_bias"
        raise error from None


# --- sampling -----------------------------------------------------------------------------------------


@dataclass
class SamplingOptions:
    """Generation options, with the meaning they have in transformers' `generate`.

    `temperature=0` or `do_sample=False` means greedy decoding; `top_k=0` and `top_p=1` switch those
    filters off; `repetition_penalty=1` and `no_repeat_ngram_size=0` too.
    """

    max_new_tokens: int = opt(100, "tokens to generate per sample")
    min_new_tokens: int = opt(0, "suppress <|endoftext|> until this many tokens are generated")
    do_sample: bool = opt(
        True, "sample (default) or decode greedily (--no-do-sample, same as --greedy or --temperature 0)"
    )
    temperature: float = opt(1.0, "divide the logits by this before sampling; 0 means greedy")
    top_k: int = opt(50, "sample among the k most likely tokens (0: all)")
    top_p: float = opt(1.0, "sample among the most likely tokens whose probability reaches p (1: all)")
    repetition_penalty: float = opt(
        1.0, "> 1 discourages tokens already in the prompt or output (transformers' meaning)"
    )
    no_repeat_ngram_size: int = opt(0, "never repeat an n-gram of this size (0: off)")
    presence_penalty: float = opt(
        0.0, "OpenAI's presence penalty: subtract this from the logits of tokens already generated (-2 to 2)"
    )
    frequency_penalty: float = opt(
        0.0, "OpenAI's frequency penalty: subtract this times a token's count in the output so far (-2 to 2)"
    )
    logit_bias: dict[int, float] | None = opt(
        None,
        "add a bias from -100 to 100 to chosen tokens' logits before sampling (OpenAI's logit_bias): "
        "'ID:BIAS,ID:BIAS' or a JSON object; -100 bans a token, 100 all but forces it",
    )
    json_schema: str | None = opt(
        None,
        "structured output: only JSON that matches this schema (a JSON text or a .json "
        'file; \'{"type": "object"}\' for any object)',
    )
    regex: str | None = opt(None, "structured output: only text that matches this regular expression")
    num_beams: int = opt(
        1,
        "beam search with this many beams (1: none); deterministic, so it needs --greedy "
        "(do_sample=False); --num-samples then returns the best hypotheses, at most --num-beams",
    )
    length_penalty: float = opt(
        1.0,
        "beam search: a hypothesis scores its summed log-probabilities divided by its "
        "new tokens (eos included) to this power; > 0 favours longer text, < 0 shorter",
    )
    early_stopping: bool | str = opt(
        False,
        "beam search: true ends a prompt's search once it has --num-beams "
        "finished hypotheses; false stops when no better one is likely; never stops "
        "only when none can be better (transformers' meaning)",
    )
    num_samples: int = opt(1, "samples per prompt (with beams: the best hypotheses, best first)")
    batch_size: int = opt(
        8, "rows generated together (prompts of different lengths are left-padded; each prompt takes --num-beams rows)"
    )
    seed: int | None = opt(
        None, "random seed; the same seed and options give the same text (default: a random seed, printed)"
    )

    MAX_NEW_TOKENS = MAX_NEW_TOKENS

    def __post_init__(self) -> None:
        if isinstance(self.logit_bias, str):  # from the command line or a config file
            self.logit_bias = parse_logit_bias(self.logit_bias)
        elif isinstance(self.logit_bias, dict):  # a JSON config's keys are strings
            self.logit_bias = {
                int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in self.logit_bias.items()
            }
        if isinstance(self.early_stopping, str) and self.early_stopping.lower() in ("true", "false", "never"):
            self.early_stopping = {"true": True, "false": False}.get(self.early_stopping.lower(), "never")

    @classmethod
    def make(cls, options: "SamplingOptions | None" = None, **overrides) -> "SamplingOptions":
        """`options` (or the defaults) with keywords replaced, checked; unknown keywords are refused by name."""
        refuse_unknown(cls, overrides, "sampling")
        opts = dataclasses.replace(options, **overrides) if options is not None else cls(**overrides)
        opts.validate()
        return opts

    def validate(self) -> None:
        def bad(name: str, value, why: str):
            error = OptionError(f"{name}={value!r}: {why}")
            error.param = name  # the field at fault, for the server's error object
            raise error

        for name in ("max_new_tokens", "min_new_tokens", "top_k", "no_repeat_ngram_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                bad(name, value, "must be an integer >= 0")
        if self.max_new_tokens > self.MAX_NEW_TOKENS:
            bad("max_new_tokens", self.max_new_tokens, f"is more than {self.MAX_NEW_TOKENS:,}; ask for fewer tokens")
        for name in ("num_samples", "batch_size", "num_beams"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(name, value, "must be an integer >= 1")
        if self.min_new_tokens > self.max_new_tokens:
            bad(
                "min_new_tokens",
                self.min_new_tokens,
                f"is above max_new_tokens={self.max_new_tokens}; lower it or raise max_new_tokens",
            )
        if not (is_number(self.temperature) and self.temperature >= 0 and math.isfinite(self.temperature)):
            bad("temperature", self.temperature, "must be >= 0 (0 means greedy decoding)")
        if not (is_number(self.top_p) and 0 < self.top_p <= 1):
            bad("top_p", self.top_p, "must be in (0, 1]; 1 switches top-p filtering off")
        if not (
            is_number(self.repetition_penalty)
            and self.repetition_penalty > 0
            and math.isfinite(self.repetition_penalty)
        ):
            bad(
                "repetition_penalty",
                self.repetition_penalty,
                "must be > 0 (1 means no penalty, > 1 discourages repeats)",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (is_number(value) and -2 <= value <= 2):
                bad(name, value, "must be a number from -2 to 2 (0: no penalty)")
        if self.logit_bias is not None:
            self._validate_logit_bias(bad)
        if self.json_schema is not None and self.regex is not None:
            bad("regex", self.regex, "give one of json_schema and regex, not both")
        if (self.json_schema is not None or self.regex is not None) and self.num_beams > 1:
            bad("num_beams", self.num_beams, "structured output samples one row at a time; use num_beams=1")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            bad("seed", self.seed, "must be an integer from 0 to 2**63 - 1")
        self._validate_beams(bad)

    def _validate_logit_bias(self, bad) -> None:
        if not isinstance(self.logit_bias, dict):
            bad("logit_bias", self.logit_bias, "must map token ids to biases from -100 to 100")
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                bad("logit_bias", self.logit_bias, f"key {token!r} must be a token id (an integer >= 0)")
            if not (is_number(bias) and -100 <= bias <= 100):
                bad("logit_bias", self.logit_bias, f"bias {bias!r} of token {token} must be a number from -100 to 100")

    def _validate_beams(self, bad) -> None:
        if not (is_number(self.length_penalty) and math.isfinite(self.length_penalty)):
            bad("length_penalty", self.length_penalty, "must be a number (1: divide by the length, 0: no penalty)")
        if self.early_stopping not in (True, False, "never") or not isinstance(self.early_stopping, (bool, str)):
            bad("early_stopping", self.early_stopping, "must be true, false or never")
        if self.num_beams == 1:
            return
        if not self.greedy:
            bad(
                "num_beams",
                self.num_beams,
                "beam search is deterministic; add do_sample=False (--greedy), "
                "or set num_beams=1 to sample (beam sampling is not supported)",
            )
        if self.num_samples > self.num_beams:
            bad(
                "num_samples",
                self.num_samples,
                f"is more than num_beams={self.num_beams}; beam search returns at most one hypothesis per beam",
            )

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0
