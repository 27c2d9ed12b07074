"""Requests in, the decoding core's options out: each OpenAI field checked (one 400 per problem, naming the field),
prompts encoded and fitted to the context, chat messages rendered with the model's template."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..chat import TemplateLimitError, check_messages
from ..constraints import ANY_JSON_OBJECT, Constraint, choice_regex, schema_text
from ..errors import DataError, OptionError
from ..generate import row_constraint
from ..options import SamplingOptions
from .protocol import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    MAX_LOGPROBS,
    ApiError,
    check_fields,
    get_field,
    logit_bias_field,
    number_field,
    stop_field,
)

_D = SamplingOptions()  # sampling defaults, written once in options.py


@dataclass
class Job:
    """A validated request: prompts (token ids) and how to generate from each."""

    prompts: list[list[int]]
    max_tokens: int
    n: int
    opts: SamplingOptions
    stop: list[str]
    stream: bool
    include_usage: bool
    truncated: int = 0  # prompt tokens cut from the left to fit the context
    echo: list[str] = field(default_factory=list)
    logprobs: int | None = None  # report log-probabilities with this many alternatives per token
    prompt_logprobs: bool = False  # and the prompt's own (echo)
    token_ids: bool = False  # name tokens "token_id:N" in log-probabilities (vLLM's return_tokens_as_token_ids)
    adapter: int = 0  # the adapter the request's `model` names (0: the base)
    constraint: Constraint | None = None  # the structured output's grammar, compiled once when checked


class RequestParsing:
    """The request checks of a `Server` (which holds the model, tokenizer, limits and chat template they use)."""

    def _job(self, body: dict, prompts: list[list[int]], default_max: int, chat: bool) -> Job:
        logprobs = self._logprobs(body, chat)
        scoring = not chat and logprobs is not None and body.get("echo") is True  # max_tokens 0 scores the prompt
        name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = get_field(body, name, (int,), None, "an integer")
        if max_tokens is None:  # the room the prompt leaves (OpenAI's meaning), never a cut into a prompt that fits;
            room = self.n_ctx - max(map(len, prompts))  # one that does not fit keeps 3/4 of the context
            max_tokens = min(default_max, self.max_tokens, room if room > 0 else max(1, self.n_ctx // 4))
        elif not (0 if scoring else 1) <= max_tokens <= self.max_tokens:
            raise ApiError(
                400,
                f"'{name}' must be between {0 if scoring else 1} and {self.max_tokens} (this server's "
                f"limit; the model's context is {self.n_ctx} tokens; 0 with echo and logprobs scores "
                f"the prompt); got {max_tokens}",
                name,
                "invalid_value",
            )
        n = number_field(body, "n", 1, 1, self.options.max_n, integer=True)
        if n * len(prompts) > self.options.max_batch:
            raise ApiError(
                400,
                f"{len(prompts)} prompt(s) x n={n} is more than the {self.options.max_batch} sequences "
                "this server runs at once; send fewer",
                "n",
                "invalid_value",
            )
        opts, constraint = self._sampling(body, max_tokens)
        stream_options = get_field(body, "stream_options", (dict,), {}, "an object")
        truncate = get_field(body, "truncate_prompt", (bool,), True, "true or false")
        cut = self._fit(prompts, max_tokens, truncate)
        return Job(
            prompts,
            max_tokens,
            n,
            opts,
            stop_field(body),
            get_field(body, "stream", (bool,), False, "true or false"),
            bool(stream_options.get("include_usage")),
            cut,
            logprobs=logprobs,
            prompt_logprobs=scoring,
            token_ids=get_field(body, "return_tokens_as_token_ids", (bool,), False, "true or false"),
            adapter=self.adapter_of(body.get("model")),
            constraint=constraint,
        )

    def _sampling(self, body: dict, max_tokens: int) -> tuple[SamplingOptions, Constraint | None]:
        """The request's sampling fields as the core's options, each checked and named as the request names it, and
        its structured output's grammar (checked by compiling it: the rows take copies)."""
        temperature = number_field(body, "temperature", _D.temperature, 0, 2)
        seed = get_field(body, "seed", (int,), _D.seed, "an integer")
        try:
            structure = self._structure(body)
        except OptionError as e:  # a schema that is not JSON, or not an object
            raise ApiError(400, str(e), self._structure_field(body), "invalid_value") from None
        opts = SamplingOptions(
            max_new_tokens=max_tokens,
            do_sample=temperature > 0,
            temperature=temperature,
            top_k=number_field(body, "top_k", _D.top_k, 0, 1 << 31, integer=True),
            top_p=number_field(body, "top_p", _D.top_p, 0, 1),
            repetition_penalty=number_field(body, "repetition_penalty", _D.repetition_penalty, 0, 100),
            presence_penalty=number_field(body, "presence_penalty", _D.presence_penalty, -2, 2),
            frequency_penalty=number_field(body, "frequency_penalty", _D.frequency_penalty, -2, 2),
            min_new_tokens=number_field(body, "min_tokens", _D.min_new_tokens, 0, max_tokens, integer=True),
            no_repeat_ngram_size=number_field(
                body, "no_repeat_ngram_size", _D.no_repeat_ngram_size, 0, 1 << 20, integer=True
            ),
            seed=seed,
            logit_bias=logit_bias_field(body, self.model.config.vocab_size),
            **structure,
        )
        try:
            opts.validate()  # a bad schema or regex is this request's 400
            constraint = row_constraint(opts, self.tokenizer, self.model.config.vocab_size, "cpu")
        except ValueError as e:  # named as the request names it
            param = getattr(e, "param", None) or self._structure_field(body)
            param = {"max_new_tokens": "max_tokens", "num_samples": "n"}.get(param, param)
            raise ApiError(400, str(e), param, "invalid_value") from None
        return opts, constraint

    def _fit(self, prompts: list[list[int]], max_tokens: int, truncate: bool) -> int:
        """Cut prompts from the left to leave `max_tokens` of room (or refuse, without truncate_prompt); the tokens
        cut."""
        room = self.n_ctx - max_tokens
        cut = 0
        for i, p in enumerate(prompts):
            if len(p) > room:
                if not truncate:
                    raise ApiError(
                        400,
                        f"the prompt is {len(p)} tokens and max_tokens is {max_tokens}, more than the "
                        f"model's context of {self.n_ctx} tokens; shorten the prompt, "
                        "lower max_tokens, or leave truncate_prompt on",
                        "prompt",
                        "context_length_exceeded",
                    )
                cut += len(p) - room
                prompts[i] = p[len(p) - room :]
        return cut

    @staticmethod
    def _structure_field(body: dict) -> str | None:
        return next((f for f in ("response_format", "guided_json", "guided_regex", "guided_choice") if f in body), None)

    @staticmethod
    def _structure(body: dict) -> dict:
        """Structured output as the core's options: OpenAI's response_format (json_object, json_schema), and vLLM's
        guided_json, guided_regex and guided_choice."""
        asked = [
            f for f in ("response_format", "guided_json", "guided_regex", "guided_choice") if body.get(f) is not None
        ]
        fmt = body.get("response_format")
        if fmt is not None and (
            not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema")
        ):
            raise ApiError(
                400,
                '\'response_format\' must be {"type": "text"}, {"type": "json_object"} or '
                '{"type": "json_schema", "json_schema": {"schema": {...}}}',
                "response_format",
                "invalid_value",
            )
        if fmt is not None and fmt["type"] == "text":
            asked.remove("response_format")
        if len(asked) > 1:
            raise ApiError(400, f"give one of {', '.join(asked)}", asked[1], "invalid_value")
        if not asked:
            return {}
        name, value = asked[0], body[asked[0]]
        if name == "response_format":
            if fmt["type"] == "json_object":
                return {"json_schema": ANY_JSON_OBJECT}
            schema = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt.get("json_schema"), dict) else None
            if not isinstance(schema, dict):
                raise ApiError(
                    400,
                    "'response_format.json_schema.schema' must be a JSON schema object",
                    "response_format",
                    "invalid_value",
                )
            return {"json_schema": schema_text(schema)}
        if name == "guided_json":
            if not isinstance(value, (dict, str)):
                raise ApiError(400, "'guided_json' must be a JSON schema", name, "invalid_type")
            return {"json_schema": schema_text(value)}
        if name == "guided_regex":
            return {"regex": get_field(body, name, (str,), None, "a regular expression")}
        if not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
            raise ApiError(400, "'guided_choice' must be a list of non-empty strings", name, "invalid_type")
        return {"regex": choice_regex(value)}

    @staticmethod
    def _logprobs(body: dict, chat: bool) -> int | None:
        """How many alternatives per token a request wants log-probabilities with (None: no log-probabilities).
        Completions send `logprobs` as that number; chat sends `logprobs: true` and `top_logprobs`."""
        if not chat:
            return (
                number_field(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
                if body.get("logprobs") is not None
                else None
            )
        wanted = get_field(body, "logprobs", (bool,), False, "true or false")
        top = number_field(body, "top_logprobs", 0, 0, MAX_LOGPROBS, integer=True)
        if top and not wanted:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
        return top if wanted else None

    def completion_job(self, body: dict) -> Job:
        check_fields(body, COMPLETION_FIELDS)
        prompt = body.get("prompt")
        if prompt is None:
            raise ApiError(400, "'prompt' is required (a string, a list of strings, or token ids)", "prompt", "missing")
        vocab = self.model.config.vocab_size
        if isinstance(prompt, str):
            texts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            texts = prompt
        elif (
            isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            texts = [prompt]
        elif (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(p, list) and p for p in prompt)
            and all(isinstance(t, int) and not isinstance(t, bool) for p in prompt for t in p)
        ):
            texts = prompt
        else:
            raise ApiError(
                400,
                "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                "prompt",
                "invalid_type",
            )
        prompts = []
        for p in texts:
            ids = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
            if ids and (min(ids) < 0 or max(ids) >= vocab):
                raise ApiError(400, f"token ids must be in [0, {vocab})", "prompt", "invalid_value")
            prompts.append(ids or [self.tokenizer.eos_id])  # an empty prompt starts from <|endoftext|>
        job = self._job(body, prompts, 16, chat=False)
        if get_field(body, "echo", (bool,), False, "true or false"):
            job.echo = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in texts]
        return job

    def chat_messages(self, body: dict) -> list[dict]:
        """The request's messages, checked as training data and `generate --chat` check them (chat.check_messages)."""
        check_fields(body, CHAT_FIELDS)
        try:
            return check_messages(body.get("messages"), "messages")
        except DataError as e:
            raise ApiError(400, str(e).removeprefix("messages: "), "messages", "invalid_value") from None

    def render_chat(self, messages: list[dict]) -> str:
        """The prompt of a conversation, bounded in time and size: the template came with the model, so one that
        loops or makes a huge string fails this request only (run it in a worker thread)."""
        try:
            return self.template.render(
                messages,
                add_generation_prompt=True,
                seconds=self.options.template_seconds,
                max_chars=4 * self.options.max_body + 65536,
            )
        except TemplateLimitError as e:
            raise ApiError(400, str(e), "messages", "chat_template_failed") from None
        except DataError as e:  # the template's own raise_exception, or a template bug
            raise ApiError(400, str(e), "messages", "invalid_value") from None

    def chat_job(self, body: dict, text: str) -> Job:
        return self._job(body, [self.tokenizer.encode(text)], 256, chat=True)

    # --- running ------------------------------------------------------------------------------------
