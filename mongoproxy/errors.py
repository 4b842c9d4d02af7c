"""The one error tree. Every user-facing error says how to fix it."""


class MongoProxyError(Exception):
    """Base of every error mongoproxy raises on purpose."""


class ConfigError(MongoProxyError):
    """A flag, environment variable or config file value is wrong; the message names the fix."""


class StartupError(MongoProxyError):
    """The proxy cannot start (port in use, unresolvable host); the message names the fix."""


class DecodeError(MongoProxyError):
    """Traffic that does not parse as MongoDB wire protocol. Counted, never fatal to forwarding.

    `reason` is a short stable token used as a metric label (e.g. "bad_length").
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class MalformedContext(MongoProxyError, ValueError):
    """A comment names a trace context but its value does not parse; ignored for tracing, never fatal."""


class ReplayError(MongoProxyError):
    """A capture file or replay target problem; the message names the file or the fix."""
