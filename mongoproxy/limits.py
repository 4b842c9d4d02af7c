"""Limits a sidecar needs: a cap on client connections, a file-descriptor budget, and rate-limited warnings.

Invariants:
- A client past --max-connections is accepted by the loop and reset at once: it costs one accept and one
  close, never a retry loop, and it is counted (mongoproxy_connections_refused_total) and logged at most
  once a minute.
- The cap fits the process's file-descriptor limit: each proxied connection holds two descriptors (client
  and upstream), so the effective cap is lowered, with one log line, when RLIMIT_NOFILE cannot hold it.
- Accept errors (EMFILE, ENFILE, ...) are counted and logged at most once a minute instead of once per attempt
  with a traceback, and the listener pauses ACCEPT_RETRY_SECONDS before accepting again, never spinning.
- Every listener goes through this module: asyncio's own (connection_made() calls admit(), the loop's exception
  handler calls accept_error()) and the TLS listener's accept loop (accept(), which admits before any handshake
  work, so the handshakes in progress count against the cap too).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from mongoproxy.config import Option, positive_int

log = logging.getLogger("mongoproxy")

DEFAULT_MAX_CONNECTIONS = 10_000
RESERVED_FDS = 64  # listeners, the admin endpoint, sink files, the loop's own descriptors
LOG_INTERVAL_SECONDS = 60.0
ACCEPT_RETRY_SECONDS = 1.0  # the pause of asyncio's own listeners after EMFILE (asyncio.constants.ACCEPT_RETRY_DELAY)
ACCEPT_ERRNOS = {errno.EMFILE: "emfile", errno.ENFILE: "enfile", errno.ENOBUFS: "enobufs", errno.ENOMEM: "enomem"}

OPTIONS: list[Option] = [
    Option(
        "max_connections",
        ("--max-connections",),
        "client connections served at once; later ones are reset at accept and counted in "
        "mongoproxy_connections_refused_total (lowered to fit the open-files limit)",
        positive_int("--max-connections"),
        DEFAULT_MAX_CONNECTIONS,
        metavar="N",
    ),
]


class RateLimitedLog:
    """Log a message at most once per `interval` per key; the next line says how many were suppressed."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL_SECONDS) -> None:
        self.logger = logger
        self.interval = interval
        self._next: dict[Any, float] = {}
        self._suppressed: dict[Any, int] = {}

    def log(self, level: int, key: Any, msg: str, *args: Any, exc_info: Any = None) -> bool:
        """Log now unless `key` was logged less than `interval` ago; True when it was logged."""
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        if len(self._next) > 10_000:  # bounded: keys may name peers
            self._next.clear()
            self._suppressed.clear()
        self._next[key] = now + self.interval
        n = self._suppressed.pop(key, 0)
        if n:
            msg += " (%d similar message(s) suppressed in the last %gs)"
            args = (*args, n, self.interval)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, key: Any, msg: str, *args: Any) -> bool:
        """log(WARNING, ...)."""
        return self.log(logging.WARNING, key, msg, *args)


def fit_fd_limit(max_connections: int, explicit: bool = True) -> int:
    """The connection cap the open-files limit can hold, raising the soft limit towards the hard one if needed."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return max_connections
    need = 2 * max_connections + RESERVED_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return max_connections
    fitted = max(1, (soft - RESERVED_FDS) // 2)
    # A cap the user chose is worth a warning; the default lowered to the container's limit is routine.
    log.log(
        logging.WARNING if explicit else logging.INFO,
        "--max-connections %d needs %d open files but the limit is %d: serving at most %d connections "
        "(raise the limit with ulimit -n or the container's nofile setting)",
        max_connections,
        need,
        soft,
        fitted,
    )
    return fitted


class ConnectionLimiter:
    """Admits clients up to the cap, counts refusals and accept errors, and logs them once a minute."""

    def __init__(self, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.max_connections = max_connections
        self.refused = 0
        self.accept_errors: dict[str, int] = {}
        # Clients admitted by accept() whose TLS handshake runs: not in the proxy's connections yet. Each
        # admission keeps connections + handshaking <= max_connections, so connection_made() admits them.
        self.handshaking = 0
        self._log = RateLimitedLog(log)

    def admit(self, open_connections: int) -> bool:
        """True when one more client may be served; otherwise count and (at most once a minute) log it."""
        if open_connections < self.max_connections:
            return True
        self.refused += 1
        self._log.warning(
            "max",
            "refusing a client: %d connections are open (--max-connections %d); %d refused so far",
            open_connections,
            self.max_connections,
            self.refused,
        )
        return False

    def accept_error(self, exc: OSError) -> None:
        """Count an error accepting a client (by errno) and log it at most once a minute."""
        reason = ACCEPT_ERRNOS.get(exc.errno or 0)
        if reason is None:
            self._log.warning(
                ("accept", exc.errno), "cannot accept a client (%s): the listener pauses and retries", exc
            )
            return
        self.accept_errors[reason] = self.accept_errors.get(reason, 0) + 1
        self._log.warning(
            ("accept", reason),
            "cannot accept a client (%s): the listener pauses and retries; %d such error(s) so far",
            exc.strerror,
            self.accept_errors[reason],
        )

    def on_loop_exception(self, loop: Any, context: dict) -> None:
        """Loop exception handler: accept errors are counted and rate-limited; the rest goes to the default."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in ACCEPT_ERRNOS and "accept" in str(context.get("message", "")):
            self.accept_error(exc)
            return
        loop.default_exception_handler(context)

    async def accept(self, lsock: socket.socket, open_connections: Callable[[], int]) -> socket.socket:
        """The next admitted client of a listening socket, for listeners with their own accept loop.

        A client over the cap (open_connections() plus the handshakes in progress) is reset here, before
        any other work; accept errors are counted and paused on like asyncio's own listeners.
        """
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(lsock)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue  # the client left before it was accepted
            except OSError as exc:
                self.accept_error(exc)
                await asyncio.sleep(ACCEPT_RETRY_SECONDS)
                continue
            if self.admit(open_connections() + self.handshaking):
                sock.setblocking(False)
                return sock
            reset(sock)

    def register(self, registry: Any) -> None:
        """Export the refusals and accept errors in `registry` (read at scrape time)."""
        registry.register(_Collector(self))


def reset(sock: socket.socket) -> None:
    """Close a client's socket with a reset (RST), not a FIN: it is refused, not served."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # already reset by the client: close() is all that is left
    sock.close()


class _Collector:
    def __init__(self, limiter: ConnectionLimiter) -> None:
        self._limiter = limiter

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        refused = CounterMetricFamily(
            "mongoproxy_connections_refused",
            "Clients reset at accept because --max-connections connections were open.",
            labels=["reason"],
        )
        refused.add_metric(["max_connections"], self._limiter.refused)
        yield refused
        errors = CounterMetricFamily(
            "mongoproxy_accept_errors",
            "Errors accepting clients (the listener pauses and retries), by errno.",
            labels=["reason"],
        )
        for reason in ACCEPT_ERRNOS.values():
            errors.add_metric([reason], self._limiter.accept_errors.get(reason, 0))
        yield errors

    def describe(self):
        from prometheus_client.core import CounterMetricFamily

        return [
            CounterMetricFamily("mongoproxy_connections_refused", "", labels=["reason"]),
            CounterMetricFamily("mongoproxy_accept_errors", "", labels=["reason"]),
        ]


def install(proxy: Any, registry: Any, loop: Any) -> None:
    """Fit the proxy's connection cap to the open-files limit, export its counters, handle accept errors."""
    explicit = getattr(proxy.config, "sources", {}).get("max_connections", "default") != "default"
    proxy.limiter.max_connections = fit_fd_limit(proxy.limiter.max_connections, explicit)
    proxy.limiter.register(registry)
    loop.set_exception_handler(proxy.limiter.on_loop_exception)
