"""The HTTP face: OpenAI-shaped routes, request validation, errors, streaming (Starlette + uvicorn).

Every error is an OpenAI error object (`{"error": {"message", "type", "param", "code"}}`) with a 4xx
status; anything unexpected is logged and answered 500 without a traceback, and the server keeps going.
Generation happens in the engine's thread; each request has its own asyncio queue that the engine
fills, so a slow reader only slows itself.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..chat import ChatTemplate, TemplateLimitError
from ..errors import DataError
from ..options import SamplingOptions
from .engine import Engine, Event, Sequence
from .guard import HostGuard, host_names
from .protocol import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    ApiError,
    check_fields,
    check_text,
    error_body,
    error_response,
    get_field,
    number_field,
    stop_field,
)
from .stream import EventStream, stream_events, usage

_D = SamplingOptions()  # sampling defaults, written once in generate.py
SHUTTING_DOWN = "the server is shutting down"


@dataclass
class ServeOptions:
    """Limits and security settings of a server (the CLI flags are made from these)."""

    api_key: str | None = None  # require `Authorization: Bearer KEY` on /v1 routes
    max_batch: int = 32  # sequences decoded together
    max_queue: int = 256  # sequences waiting beyond those; more is answered 429
    max_tokens: int | None = None  # largest max_tokens a request may ask for (default: the context - 1)
    max_body: int = 1 << 20  # request body limit in bytes
    max_n: int = 8  # choices per prompt
    model_name: str | None = None  # the id in /v1/models (default: the folder's name)
    host: str = "127.0.0.1"  # the address it listens on: the Host names it answers to follow from it
    allowed_hosts: list[str] = field(default_factory=list)  # more Host names to answer to ("*": any)
    cors_origins: list[str] = field(default_factory=list)  # other origins whose pages may call it ("*": any)
    header_timeout: float = 10.0  # seconds a client has to send a request's headers
    max_connections: int | None = None  # connections held at once (default: below the file descriptor limit)
    template_seconds: float = 3.0  # how long a chat template may take to render one request


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


class Server:
    """The state behind the routes: model, tokenizer, engine, options."""

    def __init__(self, model, tokenizer, options: ServeOptions, chat_template: str | None = None,
                 model_name: str = "model", engine: Engine | None = None, template_file: str | None = None):
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.n_ctx = model.config.n_positions
        self.name = options.model_name or model_name
        self.engine = engine or Engine(model, tokenizer, options.max_batch, options.max_queue)
        self.created = int(time.time())
        self.max_tokens = min(options.max_tokens or self.n_ctx - 1, self.n_ctx - 1)
        chat_template = chat_template or (getattr(tokenizer, "meta", None) or {}).get("chat_template")  # the folder's
        name = f"the chat template in {template_file}" if template_file else "the model's chat template"
        self.template = ChatTemplate(chat_template, tokenizer, name) if chat_template else None
        self.n_params = model.num_params()
        self.live: dict[asyncio.Queue, list[Sequence]] = {}  # each running request's queue and sequences
        self.closing = False

    # --- validation -------------------------------------------------------------------------------
    def _job(self, body: dict, prompts: list[list[int]], default_max: int, chat: bool) -> Job:
        name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = get_field(body, name, (int,), None, "an integer")
        if max_tokens is None:  # the room the prompt leaves (OpenAI's meaning), never a cut into a prompt that fits;
            room = self.n_ctx - max(map(len, prompts))  # one that does not fit keeps 3/4 of the context
            max_tokens = min(default_max, self.max_tokens, room if room > 0 else max(1, self.n_ctx // 4))
        elif not 1 <= max_tokens <= self.max_tokens:
            raise ApiError(400, f"'{name}' must be between 1 and {self.max_tokens} (this server's limit; the model's "
                                f"context is {self.n_ctx} tokens); got {max_tokens}", name, "invalid_value")
        n = number_field(body, "n", 1, 1, self.options.max_n, integer=True)
        if n * len(prompts) > self.options.max_batch:
            raise ApiError(400, f"{len(prompts)} prompt(s) x n={n} is more than the {self.options.max_batch} sequences "
                                "this server runs at once; send fewer", "n", "invalid_value")
        temperature = number_field(body, "temperature", _D.temperature, 0, 2)
        seed = get_field(body, "seed", (int,), _D.seed, "an integer")
        opts = SamplingOptions(
            max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature,
            top_k=number_field(body, "top_k", _D.top_k, 0, 1 << 31, integer=True),
            top_p=number_field(body, "top_p", _D.top_p, 0, 1),
            repetition_penalty=number_field(body, "repetition_penalty", _D.repetition_penalty, 0, 100),
            presence_penalty=number_field(body, "presence_penalty", _D.presence_penalty, -2, 2),
            frequency_penalty=number_field(body, "frequency_penalty", _D.frequency_penalty, -2, 2),
            min_new_tokens=number_field(body, "min_tokens", _D.min_new_tokens, 0, max_tokens, integer=True),
            no_repeat_ngram_size=number_field(body, "no_repeat_ngram_size", _D.no_repeat_ngram_size, 0, 1 << 20,
                                              integer=True),
            seed=seed)
        try:
            opts.validate()
        except ValueError as e:  # named as the request names it
            param = getattr(e, "param", None)
            param = {"max_new_tokens": "max_tokens", "num_samples": "n"}.get(param, param)
            raise ApiError(400, str(e), param, "invalid_value") from None
        stream_options = get_field(body, "stream_options", (dict,), {}, "an object")
        truncate = get_field(body, "truncate_prompt", (bool,), True, "true or false")
        room = self.n_ctx - max_tokens
        cut = 0
        for i, p in enumerate(prompts):
            if len(p) > room:
                if not truncate:
                    raise ApiError(400, f"the prompt is {len(p)} tokens and max_tokens is {max_tokens}, more than the "
                                        f"model's context of {self.n_ctx} tokens; shorten the prompt, "
                                        "lower max_tokens, or leave truncate_prompt on", "prompt",
                                   "context_length_exceeded")
                cut += len(p) - room
                prompts[i] = p[len(p) - room:]
        return Job(prompts, max_tokens, n, opts, stop_field(body),
                   get_field(body, "stream", (bool,), False, "true or false"),
                   bool(stream_options.get("include_usage")), cut)

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
        elif (isinstance(prompt, list) and prompt
              and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            texts = [prompt]
        elif (isinstance(prompt, list) and prompt and all(isinstance(p, list) and p for p in prompt)
              and all(isinstance(t, int) and not isinstance(t, bool) for p in prompt for t in p)):
            texts = prompt
        else:
            raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                                "such lists", "prompt", "invalid_type")
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
        """The request's messages, checked, as {role, content} with string contents."""
        check_fields(body, CHAT_FIELDS)
        if self.template is None:
            raise ApiError(400, f"model '{self.name}' has no chat template (tokenizer_config.json 'chat_template'), so "
                                "it cannot chat; use /v1/completions with a plain prompt", "messages",
                           "no_chat_template")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages",
                           "invalid_type")
        clean = []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                           for c in content):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages",
                                   "invalid_type")
                content = "".join(c["text"] for c in content)
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
                raise ApiError(400, f"messages[{i}] must be an object with a string 'role' and a string 'content'",
                               "messages", "invalid_type")
            clean.append({"role": m["role"], "content": content})
        return clean

    def render_chat(self, messages: list[dict]) -> str:
        """The prompt of a conversation, bounded in time and size: the template came with the model, so one that
        loops or makes a huge string fails this request only (run it in a worker thread)."""
        try:
            return self.template.render(messages, add_generation_prompt=True, seconds=self.options.template_seconds,
                                        max_chars=4 * self.options.max_body + 65536)
        except TemplateLimitError as e:
            raise ApiError(400, str(e), "messages", "chat_template_failed") from None
        except DataError as e:  # the template's own raise_exception, or a template bug
            raise ApiError(400, str(e), "messages", "invalid_value") from None

    def chat_job(self, body: dict, text: str) -> Job:
        return self._job(body, [self.tokenizer.encode(text)], 256, chat=True)

    # --- running ------------------------------------------------------------------------------------
    def start(self, job: Job) -> tuple[list[Sequence], asyncio.Queue]:
        if self.closing:
            raise ApiError(503, SHUTTING_DOWN, type="server_error", code="shutting_down")
        loop, q = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, event)
            except RuntimeError:  # the loop is gone (shutting down)
                pass

        seqs = []
        for i, p in enumerate(job.prompts):
            for j in range(job.n):  # choice k draws as sample k of `gptforge generate` (generate.row_seed)
                seqs.append(Sequence(p, job.opts, emit, i * job.n + j, job.stop))
        if not self.engine.submit(seqs):
            s = self.engine.stats()
            raise ApiError(429, f"the server is busy ({s['running']} running, {s['waiting']} waiting); retry later",
                           type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(self.engine.retry_after())})
        self.live[q] = seqs
        return seqs, q

    def done(self, q: asyncio.Queue) -> None:
        self.live.pop(q, None)

    def close(self) -> None:
        """Ctrl-C: end every running request now (streams with an error event and [DONE]), so that none is cut
        off by the shutdown's deadline."""
        self.closing = True
        for q, seqs in list(self.live.items()):
            self.engine.cancel(seqs)
            q.put_nowait(Event(seqs[0].choice, finish="error", error=SHUTTING_DOWN))


# --- the app -------------------------------------------------------------------------------------------


class Routes:
    """The HTTP face of a `Server`: authentication, body limits, and one handler per route."""

    def __init__(self, server: Server):
        self.server, self.options = server, server.options

    def check_key(self, request: Request) -> None:
        key_needed = self.options.api_key
        if not key_needed:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if not auth:
            raise ApiError(401, "this server needs an API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="missing_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), key_needed.encode()):
            raise ApiError(401, "invalid API key", type="authentication_error", code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        self.check_key(request)
        kind = request.headers.get("content-type", "")
        if kind.partition(";")[0].strip().lower() != "application/json":  # a page's form or text/plain post
            raise ApiError(415, f"send the body as JSON, with 'Content-Type: application/json' (got "
                                f"{repr(kind[:60]) if kind else 'no Content-Type'})", code="unsupported_media_type")
        limit = self.options.max_body
        too_big = ApiError(413, f"request body is larger than this server's limit of {limit} bytes",
                           code="body_too_large")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(400, f"request body is not UTF-8 (bad byte at position {e.start})", code="invalid_encoding")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ApiError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                           code="invalid_json") from None
        except RecursionError:  # [[[[...]]]] thousands deep: no request nests like that
            raise ApiError(400, "request body nests arrays or objects too deeply", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object", code="invalid_json")
        if "\\ud" in text.lower():  # JSON's \uXXXX escapes are the one way to send half a surrogate pair
            check_text(data)
        model = data.get("model")
        if model is not None and model != self.server.name:
            raise ApiError(404, f"model '{model}' is not served here; this server serves '{self.server.name}'",
                           "model", "model_not_found")
        return data

    def model_card(self) -> dict:
        server = self.server
        return {"id": server.name, "object": "model", "created": server.created, "owned_by": "gptforge",
                "n_params": server.n_params, "n_ctx": server.n_ctx, "chat": server.template is not None,
                "max_tokens": server.max_tokens, "auth": bool(self.options.api_key)}

    async def playground(self, request: Request) -> Response:
        page = resources.files("gptforge.serve").joinpath("playground.html").read_text(encoding="utf-8")
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.server.name, **self.server.engine.stats()})

    async def models(self, request: Request) -> Response:
        self.check_key(request)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request) -> Response:
        self.check_key(request)
        if request.path_params["name"] != self.server.name:
            raise ApiError(404, f"model '{request.path_params['name']}' is not served here", code="model_not_found")
        return JSONResponse(self.model_card())

    async def completions(self, request: Request) -> Response:
        return await self.respond(request, self.server.completion_job(await self.read_json(request)), chat=False)

    async def chat(self, request: Request) -> Response:
        body = await self.read_json(request)
        text = await asyncio.to_thread(self.server.render_chat, self.server.chat_messages(body))
        return await self.respond(request, self.server.chat_job(body, text), chat=True)

    async def respond(self, request: Request, job: Job, chat: bool) -> Response:
        server = self.server
        seqs, q = server.start(job)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": server.name}
        cut = {"X-Truncated-Prompt-Tokens": str(job.truncated)} if job.truncated else {}
        if job.stream:
            return EventStream(stream_events(job, seqs, q, head, chat), server, seqs, q, cut)
        texts = [job.echo[i // job.n] if job.echo else "" for i in range(len(seqs))]
        reasons: list[str | None] = [None] * len(seqs)
        tokens = 0
        disconnect = asyncio.ensure_future(_wait_disconnect(request))
        try:
            while None in reasons:
                get = asyncio.ensure_future(q.get())
                await asyncio.wait({get, disconnect}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    server.engine.cancel(seqs)
                    return Response(status_code=499)
                ev: Event = get.result()
                texts[ev.choice] += ev.text
                if ev.finish:
                    if ev.finish == "error":
                        server.engine.cancel(seqs)
                        raise ApiError(503 if ev.error == SHUTTING_DOWN else 500, ev.error or "generation failed",
                                       type="server_error")
                    reasons[ev.choice] = ev.finish
                    tokens += ev.completion_tokens
        finally:
            disconnect.cancel()
            server.done(q)
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        return JSONResponse({**head, "choices": choices, "usage": usage(job, tokens)}, headers=cut)

    async def error(self, request: Request, exc: Exception) -> Response:
        if isinstance(exc, ApiError):
            return error_response(exc)
        if isinstance(exc, HTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            message = f"{request.method} {request.url.path}: {exc.detail}"
            return JSONResponse(error_body(message, code=code), exc.status_code)
        traceback.print_exception(exc, file=sys.stderr)
        return JSONResponse(error_body("internal server error", "server_error"), 500)


def build_app(r: Routes, routes: list[Route], lifespan=None) -> Starlette:
    """A Starlette app with the routes every model answers (/health, /v1/models) and `routes`, its errors
    answered as OpenAI error objects, behind the Host and Origin checks (and CORS for `cors_origins`)."""
    common = [Route("/health", r.health, methods=["GET"]), Route("/v1/models", r.models, methods=["GET"]),
              Route("/v1/models/{name:path}", r.model, methods=["GET"])]
    o = r.options
    middleware = [Middleware(HostGuard, *host_names(o.host, o.allowed_hosts), o.cors_origins)]
    if o.cors_origins:  # preflights and Access-Control-* headers for the pages allowed
        middleware.append(Middleware(CORSMiddleware, allow_origins=o.cors_origins, allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"],
                                     expose_headers=["Retry-After", "X-Truncated-Prompt-Tokens"]))
    return Starlette(routes=common + routes, lifespan=lifespan, middleware=middleware,
                     exception_handlers={ApiError: r.error, HTTPException: r.error, Exception: r.error})


def create_app(server: Server) -> Starlette:
    """The Starlette app for a `Server`; the engine thread starts and stops with the app."""
    r = Routes(server)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        yield
        server.engine.stop()

    return build_app(r, [Route("/", r.playground, methods=["GET"]),
                         Route("/v1/completions", r.completions, methods=["POST"]),
                         Route("/v1/chat/completions", r.chat, methods=["POST"])], lifespan)


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
