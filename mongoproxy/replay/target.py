"""The target: the server replayed against, through pymongo's public API only.

Each recorded connection in flight holds a MongoClient of its own with maxPoolSize=1, so its commands go
over one pinned, authenticated connection, in order (pymongo reconnects it if it breaks). A client is
returned to an idle list when its recorded connection ends and reused by the next one, so the number of
clients follows the recording's concurrency, not its number of connections.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from mongoproxy.errors import ConfigError, ReplayError


class Target:
    """The server replayed against: one pinned MongoClient (maxPoolSize=1) per recorded connection in flight."""

    def __init__(self, uri: str, connect_timeout: float = 5.0, retries: int = 5, socket_timeout: float = 60.0) -> None:
        from pymongo.errors import ConfigurationError, InvalidURI

        self.uri = uri
        self.options: dict[str, Any] = {
            "serverSelectionTimeoutMS": int(connect_timeout * 1000),
            "connectTimeoutMS": int(connect_timeout * 1000),
            # A command that gets no reply within it fails with NetworkTimeout instead of hanging replay.
            "socketTimeoutMS": int(socket_timeout * 1000) if socket_timeout > 0 else None,
            "maxPoolSize": 1,
            "appname": "mongoproxy-replay",
            "retryReads": False,
            "retryWrites": False,
            # One monitoring connection per client, not two: the streaming protocol's extra RTT connection
            # would double the monitoring load of a recording with many concurrent connections.
            "serverMonitoringMode": "poll",
        }
        self._lock = threading.Lock()
        self._idle: list[Any] = []
        self._clients: list[Any] = []
        try:
            self.client = self._new_client()  # pings the target, then serves the first recorded connection
        except (InvalidURI, ConfigurationError, ValueError, TypeError) as exc:
            raise ConfigError(f"--target {redact_uri(uri)} is not a usable MongoDB URI: {exc}") from None
        self._idle.append(self.client)
        self.retries = max(1, retries)

    def _new_client(self) -> Any:
        import pymongo

        client = pymongo.MongoClient(self.uri, **self.options)
        with self._lock:
            self._clients.append(client)
        return client

    def wait_ready(self, log: Any = None) -> None:
        """Ping the target, retrying with backoff; ReplayError naming the fix when it stays unreachable."""
        from pymongo.errors import OperationFailure, PyMongoError

        delay = 0.5
        started = time.monotonic()
        last = ""
        for attempt in range(1, self.retries + 1):
            try:
                self.client.admin.command("ping")
                return
            except OperationFailure as exc:
                if exc.code in (18, 13):  # AuthenticationFailed, Unauthorized
                    raise ReplayError(
                        f"the target {redact_uri(self.uri)} refused the URI's credentials "
                        f"({exc.details.get('errmsg', exc) if exc.details else exc}): check the user, "
                        "password and authSource in --target"
                    ) from None
                last = str(exc)
            except PyMongoError as exc:
                last = str(exc).split(", Timeout:")[0]
            if attempt < self.retries:
                if log is not None:
                    log(
                        f"target {redact_uri(self.uri)} not reachable (attempt {attempt}/{self.retries}): {last}; "
                        f"retrying in {delay:g}s"
                    )
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
        raise ReplayError(
            f"cannot reach the target {redact_uri(self.uri)} after {self.retries} attempts over "
            f"{time.monotonic() - started:.0f}s ({last}): check --target and that the server is up"
        )

    def acquire(self) -> Any:
        """A pinned client for one recorded connection: an idle one, else a new one."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._new_client()

    def release(self, client: Any) -> None:
        """Give back a client whose recorded connection has ended."""
        with self._lock:
            self._idle.append(client)

    def close(self) -> None:
        """Close every client (their sessions end with them)."""
        with self._lock:
            clients, self._clients, self._idle = self._clients, [], []
        for c in clients:
            c.close()


def redact_uri(uri: str) -> str:
    """The URI with its password replaced by ***."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    creds, at, host = rest.rpartition("@")
    if not at:
        return uri
    user, colon, _ = creds.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"
