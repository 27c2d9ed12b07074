"""The OpenAI API's shapes: error objects, and the checks on request fields (one 400 per problem)."""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.responses import JSONResponse


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), e.status, headers=e.headers)


def _shown(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_text(body: dict) -> None:
    """A 400 naming the first field (or field name) whose text holds half of a UTF-16 surrogate pair: JSON can
    carry one ("\\ud83d"), but it is not text, and nothing could write it back."""
    stack: list[tuple[str, str, Any]] = [("", "", body)]
    while stack:
        top, path, value = stack.pop()
        if isinstance(value, str):
            bad, where = value, f"'{path}'"
        elif isinstance(value, list):
            stack.extend((top, f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value))))
            continue
        elif isinstance(value, dict):
            keys = [k for k in value if not _valid(k)]
            if not keys:
                stack.extend((top or k, f"{path}.{k}" if path else k, v) for k, v in reversed(value.items()))
                continue
            bad, where = keys[0], f"the field name '{_shown(path + '.' if path else '')}{_shown(keys[0])}'"
            top = top or _shown(keys[0])
        else:
            continue
        if not _valid(bad):
            i = next(i for i, c in enumerate(bad) if "\ud800" <= c <= "\udfff")
            raise ApiError(
                400,
                f"{where} is not valid text: it holds half of a surrogate pair ({_shown(bad[i])} at "
                f"position {i}); send whole characters",
                _shown(top) or None,
                "invalid_encoding",
            )


def _valid(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def get_field(body: dict, name: str, kinds: tuple, default: Any = None, what: str = "") -> Any:
    """body[name] checked against `kinds` (JSON null counts as absent)."""
    value = body.get(name, None)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {what}; got {json.dumps(value)[:60]}", name, "invalid_type")
    return value


def number_field(body: dict, name: str, default: float, lo: float, hi: float, integer: bool = False) -> float:
    what = "an integer" if integer else "a number"
    value = get_field(body, name, (int,) if integer else (int, float), default, what)
    if not (lo <= value <= hi) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be {what} between {lo} and {hi}; got {value}", name, "invalid_value")
    return value


def logit_bias_field(body: dict, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": bias from -100 to 100}, as the core's {id: bias}."""
    bias = get_field(body, "logit_bias", (dict,), None, 'an object of token ids to biases, as {"50256": -100}')
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < vocab_size):
            raise ApiError(
                400,
                f"'logit_bias' key {key!r} is not a token id (0 to {vocab_size - 1})",
                "logit_bias",
                "invalid_value",
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise ApiError(
                400,
                f"'logit_bias' of token {key} must be a number from -100 to 100; got {json.dumps(value)[:40]}",
                "logit_bias",
                "invalid_value",
            )
        out[int(key)] = float(value)
    return out


def stop_field(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", "stop", "invalid_type")
    return [s for s in stop if s]


# Fields OpenAI defines that this server cannot honour: refused when set to anything but their default.
_UNSUPPORTED = {
    "suffix": ("",),
    "best_of": (1,),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "parallel_tool_calls": (False, True),
}
_IGNORED = {
    "model",
    "user",
    "metadata",
    "store",
    "service_tier",
    "stream_options",
    "prompt_cache_key",  # a routing hint: the prefix cache finds shared prefixes by their tokens
    "safety_identifier",
}
_COMMON = {
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "repetition_penalty",
    "truncate_prompt",
    "min_tokens",
    "no_repeat_ngram_size",
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "logit_bias",
}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "logprobs", "return_tokens_as_token_ids"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "return_tokens_as_token_ids"}
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows


def check_fields(body: dict, allowed: set[str]) -> None:
    for name, value in body.items():
        if name in allowed or name in _IGNORED:
            continue
        if name in _UNSUPPORTED:
            if value is None or value in _UNSUPPORTED[name]:
                continue
            raise ApiError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")
        raise ApiError(400, f"unrecognized request field '{name}'", name, "unknown_parameter")


# --- log-probabilities in OpenAI's two shapes ---------------------------------------------------------------


def token_namer(tokenizer, as_ids: bool):
    """How log-probabilities name a token: its text, or "token_id:N" (vLLM's return_tokens_as_token_ids), which
    says which token it was where several decode to the same text (parts of one UTF-8 character)."""
    return (lambda ids: f"token_id:{ids[0]}") if as_ids else tokenizer.decode


def completion_logprobs(entries: list, decode, offset: int = 0) -> dict:
    """The legacy completions shape: token strings, their log-probabilities (None for a prompt's first token), the
    top alternatives as {token string: log-probability}, and each token's offset in the choice's text."""
    tokens = [decode([t]) for t, _, _ in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [None if lp is None else {decode([a]): v for a, v in top} for _, lp, top in entries],
        "text_offset": offsets,
    }


def chat_logprobs(entries: list, decode) -> dict:
    """The chat shape: per token its string, log-probability, UTF-8 bytes and top alternatives."""

    def item(token: int, logprob: float) -> dict:
        text = decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

    return {"content": [{**item(t, lp), "top_logprobs": [item(a, v) for a, v in top]} for t, lp, top in entries]}
