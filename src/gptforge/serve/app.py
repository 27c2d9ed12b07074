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
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..chat import ChatTemplate, template_of
from ..errors import OptionError
from ..options import ServeOptions
from .adapters import AdapterSet
from .engine import Engine, Event, Sequence
from .guard import HostGuard, host_names
from .protocol import (
    ApiError,
    chat_logprobs,
    check_text,
    completion_logprobs,
    error_body,
    error_response,
    token_namer,
)
from .requests import Job, RequestParsing
from .stream import EventStream, stream_events, usage

SHUTTING_DOWN = "the server is shutting down"


class Server(RequestParsing):
    """The state behind the routes: model, tokenizer, engine, options."""

    def __init__(
        self,
        model,
        tokenizer,
        options: ServeOptions,
        chat_template: str | None = None,
        model_name: str = "model",
        engine: Engine | None = None,
        template_file: str | None = None,
        adapters: dict | None = None,
    ):
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.n_ctx = model.config.n_positions
        self.name = options.model_name or model_name
        self.n_params = model.num_params()
        # adapters served beside the base, by name (serve/adapters.py); a request picks one with its `model`
        if adapters and self.name in adapters:
            raise OptionError(f"--adapter {self.name}=...: the base model is named {self.name!r}; name it otherwise")
        self.adapters = AdapterSet(model, adapters) if adapters else None
        self.metrics = _metrics(self.name)
        self.engine = engine or Engine(
            model,
            tokenizer,
            options.max_batch,
            options.max_queue,
            prefix_cache_bytes=int(options.prefix_cache_mb * (1 << 20)),
            metrics=self.metrics,
            adapters=self.adapters,
        )
        if self.metrics is not None:
            self.metrics.engine = self.engine
        self.created = int(time.time())
        self.max_tokens = min(options.max_tokens or self.n_ctx - 1, self.n_ctx - 1)
        # the folder's template, else gptforge's GPT-2 one, as `generate --chat` and instruction training use
        self.own_template = bool(chat_template or (getattr(tokenizer, "meta", None) or {}).get("chat_template"))
        name = f"the chat template in {template_file}" if template_file else "the model's chat template"
        if not self.own_template:
            name = "gptforge's GPT-2 chat template"
        self.template = ChatTemplate(chat_template or template_of(tokenizer), tokenizer, name)
        self.live: dict[asyncio.Queue, list[Sequence]] = {}  # each running request's queue and sequences
        self.closing = False

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
                seqs.append(
                    Sequence(
                        p,
                        job.opts,
                        emit,
                        i * job.n + j,
                        job.stop,
                        logprobs=job.logprobs,
                        prompt_logprobs=job.prompt_logprobs,
                        adapter=job.adapter,
                        constraint=job.constraint,
                    )
                )
        if not self.engine.submit(seqs):
            s = self.engine.stats()
            raise ApiError(
                429,
                f"the server is busy ({s['running']} running, {s['waiting']} waiting); retry later",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(self.engine.retry_after())},
            )
        self.live[q] = seqs
        return seqs, q

    @property
    def model_names(self) -> list[str]:
        """The base's name, then each adapter's."""
        return [self.name, *(self.adapters.names[1:] if self.adapters else [])]

    def adapter_of(self, model: str | None) -> int:
        """The adapter a request's `model` names (0: the base)."""
        return 0 if model is None or model == self.name else self.adapters.index(model)

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
            raise ApiError(
                401,
                "this server needs an API key: send 'Authorization: Bearer KEY'",
                type="authentication_error",
                code="missing_api_key",
            )
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), key_needed.encode()):
            raise ApiError(401, "invalid API key", type="authentication_error", code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        self.check_key(request)
        kind = request.headers.get("content-type", "")
        if kind.partition(";")[0].strip().lower() != "application/json":  # a page's form or text/plain post
            raise ApiError(
                415,
                f"send the body as JSON, with 'Content-Type: application/json' (got "
                f"{repr(kind[:60]) if kind else 'no Content-Type'})",
                code="unsupported_media_type",
            )
        limit = self.options.max_body
        too_big = ApiError(
            413, f"request body is larger than this server's limit of {limit} bytes", code="body_too_large"
        )
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
            raise ApiError(
                400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", code="invalid_json"
            ) from None
        except RecursionError:  # [[[[...]]]] thousands deep: no request nests like that
            raise ApiError(400, "request body nests arrays or objects too deeply", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object", code="invalid_json")
        if "\\ud" in text.lower():  # JSON's \uXXXX escapes are the one way to send half a surrogate pair
            check_text(data)
        model = data.get("model")
        if model is not None and model not in self.server.model_names:
            raise ApiError(
                404,
                f"model {json.dumps(model)[:80]} is not served here; this server serves "
                f"{', '.join(repr(n) for n in self.server.model_names)}",
                "model",
                "model_not_found",
            )
        return data

    def model_card(self, name: str) -> dict:
        server = self.server
        adapter = {"parent": server.name, "adapter": True} if name != server.name else {}
        return {
            "id": name,
            "object": "model",
            "created": server.created,
            "owned_by": "gptforge",
            "n_params": server.n_params,
            "n_ctx": server.n_ctx,
            "chat": True,
            "chat_template": "the model's" if server.own_template else "gptforge's GPT-2 default",
            "max_tokens": server.max_tokens,
            "auth": bool(self.options.api_key),
            "root": server.name,
            **adapter,
        }

    async def playground(self, request: Request) -> Response:
        page = resources.files("gptforge.serve").joinpath("playground.html").read_text(encoding="utf-8")
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.server.name, **self.server.engine.stats()})

    async def metrics(self, request: Request) -> Response:
        m = self.server.metrics
        if m is None:
            raise ApiError(404, "metrics need prometheus-client: pip install 'gptforge[serve]'", code="not_found")
        return Response(m.render(), media_type=m.content_type)

    async def models(self, request: Request) -> Response:
        self.check_key(request)
        return JSONResponse({"object": "list", "data": [self.model_card(n) for n in self.server.model_names]})

    async def model(self, request: Request) -> Response:
        self.check_key(request)
        name = request.path_params["name"]
        if name not in self.server.model_names:
            raise ApiError(404, f"model '{name}' is not served here", code="model_not_found")
        return JSONResponse(self.model_card(name))

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
        head = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": server.model_names[job.adapter],
        }
        cut = {"X-Truncated-Prompt-Tokens": str(job.truncated)} if job.truncated else {}
        if job.stream:

            def close() -> None:
                server.engine.cancel(seqs)  # a no-op for sequences that have finished
                server.done(q)

            return EventStream(stream_events(job, seqs, q, head, chat, server.tokenizer), close, cut)
        texts = [job.echo[i // job.n] if job.echo else "" for i in range(len(seqs))]
        scored: list[list] = [[] for _ in seqs]  # (token, log-probability, alternatives) per choice
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
                scored[ev.choice] += ev.logprobs or []
                if ev.finish:
                    if ev.finish == "error":
                        server.engine.cancel(seqs)
                        raise ApiError(
                            503 if ev.error == SHUTTING_DOWN else 500,
                            ev.error or "generation failed",
                            type="server_error",
                        )
                    reasons[ev.choice] = ev.finish
                    tokens += ev.completion_tokens
        finally:
            disconnect.cancel()
            server.done(q)
        decode = token_namer(server.tokenizer, job.token_ids)
        if job.logprobs is None:
            logprobs = [None] * len(seqs)
        elif chat:
            logprobs = [chat_logprobs(e, decode) for e in scored]
        else:  # offsets count from the start of the choice's text, the echoed prompt's when its tokens are not scored
            logprobs = [
                completion_logprobs(e, decode, 0 if job.prompt_logprobs or not job.echo else len(job.echo[i // job.n]))
                for i, e in enumerate(scored)
            ]
        if chat:
            choices = [
                {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": lp, "finish_reason": r}
                for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs))
            ]
        else:
            choices = [
                {"index": i, "text": t, "logprobs": lp, "finish_reason": r}
                for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs))
            ]
        return JSONResponse({**head, "choices": choices, "usage": usage(job, tokens, seqs)}, headers=cut)

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
    common = [
        Route("/health", r.health, methods=["GET"]),
        Route("/v1/models", r.models, methods=["GET"]),
        Route("/v1/models/{name:path}", r.model, methods=["GET"]),
    ]
    o = r.options
    middleware = [Middleware(HostGuard, *host_names(o.host, o.allowed_hosts), o.cors_origins)]
    if o.cors_origins:  # preflights and Access-Control-* headers for the pages allowed
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=o.cors_origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
                expose_headers=["Retry-After", "X-Truncated-Prompt-Tokens"],
            )
        )
    return Starlette(
        routes=common + routes,
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={ApiError: r.error, HTTPException: r.error, Exception: r.error},
    )


def create_app(server: Server) -> Starlette:
    """The Starlette app for a `Server`; the engine thread starts and stops with the app."""
    r = Routes(server)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        yield
        server.engine.stop()

    return build_app(
        r,
        [
            Route("/", r.playground, methods=["GET"]),
            Route("/metrics", r.metrics, methods=["GET"]),
            Route("/v1/completions", r.completions, methods=["POST"]),
            Route("/v1/chat/completions", r.chat, methods=["POST"]),
        ],
        lifespan,
    )


def _metrics(model_name: str):
    """The server's Prometheus instruments (serve/metrics.py), or None without prometheus-client."""
    try:
        from .metrics import ServeMetrics
    except ImportError:
        return None
    return ServeMetrics(model_name)


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
