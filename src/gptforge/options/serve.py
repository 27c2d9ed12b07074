"""Options of `gptforge serve`."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import OptionError
from .base import (
    check_fields,
    opt,
)

# --- serving ------------------------------------------------------------------------------------------------

SERVE_LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class ServeOptions:
    """`gptforge serve`: where it listens, who may call it, and how much it takes on at once (docs/serve.md)."""

    host: str = opt(
        "127.0.0.1",
        "address to listen on: 127.0.0.1 is this machine only; 0.0.0.0 opens it to the network, so set --api-key",
    )
    port: int = opt(8000, "port (0 picks a free one)")
    api_key: str | None = opt(
        None, "require 'Authorization: Bearer KEY' on /v1 routes (default: $GPTFORGE_API_KEY if set)"
    )
    model_name: str | None = opt(None, "the model id clients use (default: the folder's name)")
    max_batch: int = opt(32, "sequences generated together")
    max_queue: int = opt(256, "sequences that may wait beyond --max-batch; more are answered 429")
    max_tokens: int | None = opt(None, "largest max_tokens a request may ask (default: the context - 1)")
    prefix_cache_mb: float = opt(
        512.0,
        "memory for the prefix cache in MiB: prompts that begin alike (a system prompt, a few-shot block) reuse "
        "the keys and values computed for that beginning; least recently used blocks go first (0: off)",
    )
    max_body: int = opt(1 << 20, "request body limit in bytes")
    max_n: int = opt(8, "choices per prompt a request may ask for (n)")
    allowed_hosts: list[str] = opt(
        list,
        "more Host names to answer to, comma-separated ('*.example.com' a domain, "
        "'*' any); by default only the names it listens as (for 127.0.0.1: localhost, "
        "127.0.0.1, ::1)",
    )
    cors_origins: list[str] = opt(
        list,
        "web pages of other origins that may call the API, comma-separated, as "
        "'https://app.example:8443' ('*' any); by default only the playground's own",
    )
    header_timeout: float = opt(10.0, "seconds a client has to send a request's headers")
    max_connections: int | None = opt(
        None, "connections held at once; one more is answered 503 (default: 64 below the open-file limit, at most 4096)"
    )
    template_seconds: float = opt(3.0, "seconds a chat template may take to render one request")
    log_level: str = opt("warning", "uvicorn's log level; info shows each request", choices=SERVE_LOG_LEVELS)

    def __post_init__(self) -> None:
        for name in ("allowed_hosts", "cors_origins"):  # "a,b" from the command line or a config file
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [n.strip() for n in value.split(",") if n.strip()])
        check_fields(
            self,
            {
                "port": (0, 65535, True, int),
                "max_batch": (1, None, True, int),
                "max_queue": (0, None, True, int),
                "max_tokens": (1, None, True, int),
                "max_body": (1024, None, True, int),
                "prefix_cache_mb": (0, None, True, float),
                "max_n": (1, None, True, int),
                "header_timeout": (0, None, False, float),
                "max_connections": (1, None, True, int),
                "template_seconds": (0, None, False, float),
            },
        )
        if self.log_level not in SERVE_LOG_LEVELS:
            raise OptionError(f"--log-level {self.log_level!r}: choose {', '.join(SERVE_LOG_LEVELS)}")
