"""CollectingSink: an in-memory sink for tests that keeps every event it is given."""

from __future__ import annotations

from dataclasses import dataclass, field

from mongoproxy.events import CommandEvent, Connection, DecodeErrorEvent, UpstreamConnectError


@dataclass(slots=True, eq=False)
class CollectingSink:
    """A test sink that keeps everything it is given, in order."""

    name: str = "collect"
    commands: list = field(default_factory=list)
    opened: list = field(default_factory=list)
    closed: list = field(default_factory=list)
    decode_errors: list = field(default_factory=list)
    upstream_errors: list = field(default_factory=list)
    unmatched: list = field(default_factory=list)
    dropped: int = 0

    def on_connection_open(self, conn: Connection) -> None:
        self.opened.append(conn)

    def on_connection_close(self, conn: Connection) -> None:
        self.closed.append(conn)

    def on_command(self, event: CommandEvent) -> None:
        self.commands.append(event)

    def on_decode_error(self, event: DecodeErrorEvent) -> None:
        self.decode_errors.append(event)

    def on_upstream_error(self, event: UpstreamConnectError) -> None:
        self.upstream_errors.append(event)

    def on_unmatched_reply(self, conn: Connection, response_to: int) -> None:
        self.unmatched.append((conn, response_to))

    def on_requests_dropped(self, conn: Connection, count: int) -> None:
        self.dropped += count
