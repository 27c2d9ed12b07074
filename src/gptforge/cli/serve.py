"""The command that serves a model over HTTP."""

from __future__ import annotations


def add_serve_command(sub) -> None:
    from ..serve import add_serve_arguments, run_from_args

    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP: an OpenAI-compatible API and a web playground",
        description="An OpenAI-compatible API (/v1/completions, /v1/chat/completions, streaming) with "
        "continuous batching, and a playground page at /. Needs `pip install 'gptforge[serve]'`.",
    )
    add_serve_arguments(p)
    p.set_defaults(func=run_from_args)
