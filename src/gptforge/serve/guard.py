"""The server's defences below the routes: which Host and Origin may talk to it, how long a client may take to
send its headers, how many connections it holds, and a Ctrl-C that ends running streams cleanly.

A web page must not drive a server on this machine: a page that rebinds its own name to 127.0.0.1 (DNS
rebinding) sends `Host: its-name`, so only the names the server listens as are accepted; a page on another
origin is refused unless `--cors-origins` names it (Starlette's CORSMiddleware then answers its preflight).
uvicorn's own settings do not bound a client that sends half a request and waits: its keep-alive timer runs
only between requests, and `limit_concurrency` answers 503 only once a whole request has arrived, so each
such client holds a file descriptor for good. `GuardedProtocol` gives each request's headers a deadline and
refuses connections beyond a cap set below the process's descriptor limit.
"""

from __future__ import annotations

import ipaddress
import socket

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import ApiError, error_response

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("", "0.0.0.0", "::")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_loopback(name: str) -> bool:
    return name == "localhost" or _is_ip(name) and ipaddress.ip_address(name).is_loopback


def host_names(listen: str, extra: list[str] | tuple = ()) -> tuple[set[str], bool]:
    """The Host names a server listening on `listen` answers to, and whether any IP address is one of them
    (a server on every interface answers to each of its addresses; DNS rebinding needs a name, not a number)."""
    listen = listen.strip("[]").lower()
    names = {listen, *(n.strip("[]").lower().rstrip(".") for n in extra)}
    if _is_loopback(listen) or listen in WILDCARDS:
        names.update(LOOPBACK_NAMES)
    if listen in WILDCARDS:
        names.update({socket.gethostname().lower(), socket.getfqdn().lower()})
    return names, listen in WILDCARDS


def _host_of(value: str) -> str:
    """The name in a Host header (or an origin's netloc), without the port: `[::1]:80` -> `::1`."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class HostGuard:
    """ASGI middleware: a 400 for a Host the server does not answer to, a 403 for a request from a page on
    another origin (same origin: the Origin's host and port are the Host header's) unless it is allowed.
    (Starlette's TrustedHostMiddleware answers a bare "Invalid host header" that names no flag, and cannot take
    any IP address for a server on every interface.)"""

    def __init__(self, app, names: set[str], any_ip: bool, origins: list[str] | tuple = ()):
        self.app, self.names, self.any_ip = app, names, any_ip
        self.any_host = "*" in names
        self.origins = {o.rstrip("/") for o in origins}

    def host_allowed(self, host: str) -> bool:
        name = _host_of(host).rstrip(".")
        return (
            self.any_host
            or name in self.names
            or (self.any_ip and _is_ip(name))
            or any(n.startswith("*.") and name.endswith(n[1:]) for n in self.names)
        )

    def origin_allowed(self, origin: str, host: str) -> bool:
        netloc = origin.partition("://")[2].rstrip("/")
        return "*" in self.origins or origin.rstrip("/") in self.origins or bool(netloc) and netloc == host.lower()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in (b"host", b"origin")}
        host, origin = headers.get("host", ""), headers.get("origin")
        error = None
        if not self.host_allowed(host):
            shown = _host_of(host) or "(none)"
            error = ApiError(
                400,
                f"Host '{shown[:100]}' is not a name this server answers to; to allow it, start the "
                f"server with --allowed-hosts {shown[:100]}",
                code="invalid_host",
            )
        elif origin is not None and not self.origin_allowed(origin, host):
            error = ApiError(
                403,
                f"cross-origin request from '{origin[:100]}' refused; to allow that page, start "
                f"the server with --cors-origins {origin[:100]}",
                code="cross_origin_refused",
            )
        if error is not None:
            return await error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)


_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
    b"Content-Length: 53\r\n\r\nthis server holds as many connections as it may; retry"
)
_SLOW = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
    b"Content-Length: 39\r\n\r\nthe request's headers came too slowly\r\n"
)


def default_max_connections() -> int:
    """Connections held at once: below the process's file descriptor limit, leaving room for its own files."""
    try:
        import resource
    except ImportError:  # Windows
        return 1000
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 4096 if soft == resource.RLIM_INFINITY else max(8, min(4096, soft - 64))


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers (from the connection's start, and
    from the end of the previous response) and a cap on open connections: one past it is answered 503 and
    closed at once, so its descriptor comes back."""

    header_timeout: float = 10.0
    max_connections: int = 1000

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline, self._refused = None, len(self.connections) > self.max_connections
        if self._refused:  # answered now; closed once its request is read (a close with unread data resets it)
            transport.write(_BUSY)
            self._deadline = self.loop.call_later(min(1.0, self.header_timeout), transport.close)
            return
        self._arm()

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # still no complete head
            self.transport.write(_SLOW)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self.transport.close()
            return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in: the request is the app's now
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._disarm()
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def protocol_class(header_timeout: float, max_connections: int) -> type[GuardedProtocol]:
    """A GuardedProtocol with these bounds (uvicorn makes one protocol object per connection from a class)."""
    return type(
        "GuardedProtocol", (GuardedProtocol,), {"header_timeout": header_timeout, "max_connections": max_connections}
    )


def run(app, sock: socket.socket, on_exit, header_timeout: float, max_connections: int, log_level: str) -> None:
    """Serve `app` on the bound `sock` with uvicorn until Ctrl-C or SIGTERM; `on_exit()` runs on the event loop
    as soon as the signal arrives (to end running streams), before uvicorn waits for connections to close."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            loop = getattr(self, "_gptforge_loop", None)
            if loop is not None:
                loop.call_soon_threadsafe(on_exit)

        async def startup(self, sockets=None) -> None:
            import asyncio

            self._gptforge_loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)

    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=log_level in ("debug", "info"),
        timeout_graceful_shutdown=3,
        http=protocol_class(header_timeout, max_connections),
    )
    try:
        Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C again once it has shut down
        pass


__all__ = ["GuardedProtocol", "HostGuard", "default_max_connections", "host_names", "protocol_class", "run"]
