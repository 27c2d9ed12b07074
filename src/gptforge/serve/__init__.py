"""`gptforge serve`: an OpenAI-compatible HTTP API with continuous batching, and a web playground.

    pip install 'gptforge[serve]'
    gptforge serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY]

This face imports neither torch nor the web stack: `add_serve_arguments(parser)` adds the flags to an
argparse parser and `run_from_args(args)` loads the model and serves until Ctrl-C. `create_app`,
`Server`, `ServeOptions` and `Engine` load lazily. See docs/serve.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from ..errors import GPTForgeError

API_KEY_ENV = "GPTFORGE_API_KEY"


class ServeError(GPTForgeError, ValueError):
    """A serve option or environment that cannot work; printed as one line."""


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `serve` flags (defaults from ServeOptions, without importing it)."""
    parser.add_argument("model", help="model folder (or hub id) to serve")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the "
        "network, so set --api-key)",
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV} if set)",
    )
    parser.add_argument("--model-name", help="the model id clients use (default: the folder's name)")
    parser.add_argument("--max-batch", type=int, default=32, help="sequences generated together (default: 32)")
    parser.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="sequences that may wait beyond --max-batch; more are answered 429 (default: 256)",
    )
    parser.add_argument("--max-tokens", type=int, help="largest max_tokens a request may ask (default: context - 1)")
    parser.add_argument("--max-body", type=int, default=1 << 20, help="request body limit in bytes (default: 1 MiB)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: auto)")
    parser.add_argument("--adapter", help="LoRA adapter folder (gptforge's or peft's), merged into the model on load")
    parser.add_argument(
        "--quantize", choices=("int8",), help="int8 weights for the linear layers and the head, made on load"
    )
    parser.add_argument(
        "--allowed-hosts",
        type=_names,
        default=[],
        metavar="NAMES",
        help="more Host names to answer to, comma-separated ('*.example.com' a domain, '*' any); "
        "by default only the names it listens as (for 127.0.0.1: localhost, 127.0.0.1, ::1)",
    )
    parser.add_argument(
        "--cors-origins",
        type=_names,
        default=[],
        metavar="ORIGINS",
        help="web pages of other origins that may call the API, comma-separated, as "
        "'https://app.example:8443' ('*' any); by default only the playground's own",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds a client has to send a request's headers (default: 10)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="connections held at once; one more is answered 503 (default: 64 below the open-file limit, at most 4096)",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=("debug", "info", "warning", "error"),
        help="uvicorn's log level; info shows each request (default: warning)",
    )
    return parser


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def run_from_args(args: argparse.Namespace) -> int:
    """Load the model named in `args` and serve it until interrupted; returns an exit code."""
    for name, low in (("max_batch", 1), ("max_queue", 0), ("max_body", 1024), ("port", 0)):
        if getattr(args, name) < low:
            raise ServeError(f"--{name.replace('_', '-')} must be at least {low}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ServeError("--max-tokens must be at least 1")
    if args.max_connections is not None and args.max_connections < 1:
        raise ServeError("--max-connections must be at least 1")
    if not 0 < args.header_timeout < float("inf"):
        raise ServeError(f"--header-timeout {args.header_timeout}: give a number of seconds above 0")
    if args.port > 65535:
        raise ServeError(f"--port {args.port}: a port is a number from 0 to 65535 (0 picks a free one)")
    try:
        import uvicorn  # noqa: F401

        from ..chat import chat_template_file, read_chat_template
        from .app import ServeOptions, Server, create_app
        from .guard import default_max_connections, run
    except ImportError as e:
        raise ServeError(f"serving needs the web extra ({e.name} is missing): pip install 'gptforge[serve]'") from None
    from ..adapters import load_with_adapter, read_adapter, resolve_base
    from ..classify import is_classifier_folder

    base, adapter = resolve_base(args.model, args.adapter)  # MODEL may be an adapter folder naming its base
    if adapter:
        read_adapter(adapter)  # a bad adapter fails before the port is taken
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    try:  # bind first: a port in use should fail before the model takes seconds to load
        sock = socket.create_server((args.host, args.port))
    except OSError as e:
        raise ServeError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    options = ServeOptions(
        api_key=api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_tokens=args.max_tokens,
        max_body=args.max_body,
        model_name=args.model_name,
        host=args.host,
        allowed_hosts=args.allowed_hosts,
        cors_origins=args.cors_origins,
        header_timeout=args.header_timeout,
        max_connections=args.max_connections,
    )
    name = Path(str(args.model).rstrip("/\\")).name or "model"
    if is_classifier_folder(base):  # labels and probabilities on /v1/classifications
        server, app = _classifier_app(base, adapter, args, options, name)
    else:
        model, tokenizer = load_with_adapter(base, adapter, device=args.device, quantize=args.quantize)
        folder = Path(adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else base)
        folder = folder if folder.is_dir() else folder.parent
        template = read_chat_template(folder) if folder.is_dir() else None
        server = Server(
            model,
            tokenizer,
            options,
            template,
            model_name=name,
            template_file=str(chat_template_file(folder)) if template else None,
        )
        app = create_app(server)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"gptforge serve: {server.name} ({server.n_params / 1e6:.1f}M parameters) on http://{shown}:{port}  "
        f"({'playground: /, API: /v1' if hasattr(server, 'engine') else 'API: /v1/classifications'}, "
        f"auth: {'API key' if api_key else 'none'})",
        flush=True,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print("gptforge serve: warning: listening beyond this machine without --api-key", file=sys.stderr, flush=True)
    run(
        app,
        sock,
        getattr(server, "close", lambda: None),
        args.header_timeout,
        args.max_connections or default_max_connections(),
        args.log_level,
    )
    return 0


def _classifier_app(base, adapter, args, options, name: str):
    """The server and app of a classification folder (no generation routes, no playground)."""
    from ..classify import load_classifier
    from ..runtime import resolve_device
    from ..tokenizer import load_tokenizer
    from .classify import ClassifierServer, create_classifier_app

    if adapter or args.quantize:
        raise ServeError(f"{base}: a classifier is served as it is; --adapter and --quantize are for language models")
    server = ClassifierServer(
        load_classifier(base, device=resolve_device(args.device)), load_tokenizer(base), options, model_name=name
    )
    return server, create_classifier_app(server)


def main(argv: list[str] | None = None) -> int:
    parser = add_serve_arguments(
        argparse.ArgumentParser(
            prog="python -m gptforge.serve", description="Serve a model: OpenAI-compatible API and a web playground."
        )
    )
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"gptforge serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def __getattr__(name: str):
    if name in ("create_app", "Server", "ServeOptions", "ApiError"):
        from . import app

        return getattr(app, name)
    if name in ("Engine", "Sequence", "Event", "RowCache"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["API_KEY_ENV", "ServeError", "add_serve_arguments", "create_app", "main", "run_from_args"]
