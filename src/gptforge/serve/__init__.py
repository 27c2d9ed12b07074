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
    """The `serve` flags: ServeOptions' fields, and how to open the model."""
    from ..options import ServeOptions
    from ..options.flags import add_dataclass_options

    parser.add_argument("model", help="model folder (or hub id) to serve")
    add_dataclass_options(parser, ServeOptions)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: auto)")
    parser.add_argument(
        "--adapter",
        action="append",
        help="LoRA adapter folder (gptforge's or peft's): DIR is merged into the model on load; NAME=DIR (repeat it) "
        "is served beside the base without merging, to requests whose 'model' is NAME",
    )
    parser.add_argument(
        "--quantize", choices=("int8",), help="int8 weights for the linear layers and the head, made on load"
    )
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Load the model named in `args` and serve it until interrupted; returns an exit code."""
    from ..options import ServeOptions
    from ..options.flags import option_values

    fields = option_values(args, ServeOptions)
    options = ServeOptions(**{**fields, "api_key": fields["api_key"] or os.environ.get(API_KEY_ENV) or None})
    try:
        import uvicorn  # noqa: F401

        from .app import create_app
        from .guard import default_max_connections, run
    except ImportError as e:
        raise ServeError(f"serving needs the web extra ({e.name} is missing): pip install 'gptforge[serve]'") from None
    from ..adapters import read_adapter, resolve_base
    from ..classify import is_classifier_folder
    from .adapters import parse_adapter_flags

    adapter, named = parse_adapter_flags(args.adapter)
    base, adapter = resolve_base(args.model, adapter)  # MODEL may be an adapter folder naming its base
    for folder in [adapter, *named.values()] if adapter else named.values():
        read_adapter(folder)  # a bad adapter fails before the port is taken
    if named and args.quantize:
        raise ServeError("--adapter NAME=DIR serves adapters beside fp32 weights; leave out --quantize")
    api_key = options.api_key
    try:  # bind first: a port in use should fail before the model takes seconds to load
        sock = socket.create_server((args.host, args.port))
    except OSError as e:
        raise ServeError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    name = Path(str(args.model).rstrip("/\\")).name or "model"
    if is_classifier_folder(base):  # labels and probabilities on /v1/classifications
        server, app = _classifier_app(base, adapter or named, args, options, name)
    else:
        server = _language_model_server(base, adapter, named, args, options, name)
        app = create_app(server)
        _measure_paths(server.model)  # the first request must not wait for the kernel's build and measurement
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
        options.header_timeout,
        options.max_connections or default_max_connections(),
        options.log_level,
    )
    return 0


def _language_model_server(base, adapter, named: dict, args, options, name: str):
    """The `Server` of a language model: the base (an adapter merged into it), the adapters served beside it, and
    the chat template of the folder (the merged adapter's own, when it has one)."""
    from ..chat import chat_template_file, read_chat_template
    from ..checkpoint import load_model_and_tokenizer
    from .app import Server

    model, tokenizer = load_model_and_tokenizer(base, adapter=adapter, device=args.device, quantize=args.quantize)
    folder = Path(adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else base)
    folder = folder if folder.is_dir() else folder.parent
    template = read_chat_template(folder) if folder.is_dir() else None
    return Server(
        model,
        tokenizer,
        options,
        template,
        model_name=name,
        template_file=str(chat_template_file(folder)) if template else None,
        adapters=named,
    )


def _measure_paths(model) -> None:
    """Build the decoding kernel and measure which CPU paths to take now, before the server says it listens
    (calibrate.py; at most a few seconds, once per machine: the choices are stored)."""
    if model.transformer.wte.weight.device.type != "cpu":
        return
    from .. import calibrate

    try:
        for name in calibrate.DEFAULTS:
            calibrate.decision(name)
    except GPTForgeError:
        raise  # GPTFORGE_CALIBRATION or GPTFORGE_ISA the user set wrong: said at once
    except Exception as e:  # noqa: BLE001 - a failed measurement leaves the default paths, which work
        print(f"gptforge serve: the CPU paths were not measured ({e}); using the defaults", file=sys.stderr)


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
    if name == "ServeOptions":
        from ..options import ServeOptions

        return ServeOptions
    if name in ("create_app", "Server", "ApiError"):
        from . import app

        return getattr(app, name)
    if name in ("Engine", "Sequence", "Event", "RowCache"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["API_KEY_ENV", "ServeError", "add_serve_arguments", "create_app", "main", "run_from_args"]
