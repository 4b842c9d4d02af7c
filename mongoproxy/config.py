"""One frozen Config built from flags, MONGOPROXY_* environment variables and an optional TOML file.

Precedence: flag > environment > file > default. Options are declared as
`Option` rows; the core's are here, and each sink module contributes its own
`OPTIONS` list (see OPTION_MODULES), so a new sink adds flags without
touching the CLI. Every parser raises ConfigError with a message that names
the fix.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mongoproxy.errors import ConfigError

ENV_PREFIX = "MONGOPROXY_"

# Modules that contribute an OPTIONS list, in the order their flags appear in --help.
OPTION_MODULES = (
    "mongoproxy.limits",
    "mongoproxy.admin",
    "mongoproxy.sinks.metrics",
    "mongoproxy.sinks.commandlog",
    "mongoproxy.sinks.tracing",
    "mongoproxy.sinks.capture",
    "mongoproxy.sinks.mirror",
    "mongoproxy.sinks.digest",
    "mongoproxy.sinks.live",
    "mongoproxy.tls",
    "mongoproxy.faults",
    "mongoproxy.topology",
)


@dataclass(frozen=True)
class Option:
    """One setting: its flag(s), environment variable, parser and default."""

    dest: str
    flags: tuple[str, ...]
    help: str
    parse: Callable[[str], Any] = str
    default: Any = None
    multiple: bool = False  # repeatable flag; env/file give a comma-separated or list value
    switch: bool = False  # a flag without a value (store_true)
    metavar: str | None = None
    group: str = "proxy"
    separator: str | None = ","  # how env/file strings of a repeatable option split (None: on whitespace)

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()

    @property
    def flag(self) -> str:
        return self.flags[0]


# ---- value parsers: each raises ConfigError naming the fix ----


def parse_bool(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{value!r} is not a boolean: use true or false")


def parse_port(value: str) -> int:
    try:
        port = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{value!r} is not a port number: use an integer from 1 to 65535") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range: use an integer from 1 to 65535")
    return port


def positive_int(what: str) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            n = int(str(value).strip().replace("_", ""))
        except ValueError:
            raise ConfigError(f"{what} {value!r} is not a whole number: give a positive integer") from None
        if n <= 0:
            raise ConfigError(f"{what} must be positive, got {n}")
        return n

    return parse


def non_negative_float(what: str) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            x = float(str(value).strip())
        except ValueError:
            raise ConfigError(f"{what} {value!r} is not a number: give e.g. 15 or 0.5") from None
        if not x >= 0 or x == float("inf"):
            raise ConfigError(f"{what} must be a finite number >= 0, got {value!r}")
        return x

    return parse


def parse_host(value: str) -> str:
    host = str(value).strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ConfigError("empty host: give a name, an IPv4 address or an IPv6 address")
    return host


def parse_hosts(value: Any) -> tuple[str, ...]:
    """One or more comma-separated hosts (IPv6 with or without brackets)."""
    hosts = tuple(parse_host(h) for h in _split_list(value))
    if not hosts:
        raise ConfigError("empty host list: give at least one address, e.g. 127.0.0.1")
    return hosts


@dataclass(frozen=True)
class ProxySpec:
    """One listener: `PORT` (transparent) or `PORT:HOST:PORT` (static upstream)."""

    listen_port: int
    upstream_host: str | None = None  # None in transparent mode
    upstream_port: int | None = None
    text: str = ""

    @property
    def transparent(self) -> bool:
        return self.upstream_host is None


def parse_proxy_spec(value: str) -> ProxySpec:
    """Parse PORT or PORT:HOST:PORT (HOST may be a name, an IPv4 address or [IPv6])."""
    text = str(value).strip()
    hint = "use PORT (transparent mode) or PORT:HOST:PORT, e.g. 27113:localhost:27017 or 27113:[::1]:27017"
    if not text:
        raise ConfigError(f"empty --proxy value: {hint}")
    if text.isdigit():
        try:
            return ProxySpec(parse_port(text), text=text)
        except ConfigError as exc:
            raise ConfigError(f"--proxy {text!r}: {exc}") from None
    listen, sep, rest = text.partition(":")
    if not sep or not listen.isdigit():
        raise ConfigError(f"--proxy {text!r} is malformed: {hint}")
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0 or rest[end + 1 : end + 2] != ":":
            raise ConfigError(f"--proxy {text!r} is malformed: close the IPv6 address with ']:' ({hint})")
        host, port = rest[1:end], rest[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"--proxy {text!r}: {host!r} is not an IPv6 address ({hint})") from None
    else:
        host, sep, port = rest.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"--proxy {text!r} is malformed: {hint}")
        if ":" in host:
            raise ConfigError(f"--proxy {text!r}: put an IPv6 address in brackets, e.g. 27113:[{host}]:{port}")
    if not port.isdigit():
        raise ConfigError(f"--proxy {text!r}: upstream port {port!r} is not a number ({hint})")
    try:
        # Listen port 0 picks a free port (tests, the demo).
        return ProxySpec(0 if listen == "0" else parse_port(listen), host, parse_port(port), text=text)
    except ConfigError as exc:
        raise ConfigError(f"--proxy {text!r}: {exc}") from None


# ---- the core's options ----

# --log-level, for every command that logs: the proxy's own in CORE_OPTIONS, the webhook's in its group.
LOG_LEVEL = Option(
    "log_level",
    ("--log-level",),
    "debug, info, warning or error",
    lambda v: _choice(v, "--log-level", ("debug", "info", "warning", "error")),
    "info",
    metavar="LEVEL",
)

CORE_OPTIONS: list[Option] = [
    Option(
        "proxy",
        ("--proxy",),
        "listener: PORT (transparent, upstream from SO_ORIGINAL_DST) or PORT:HOST:PORT "
        "(static upstream; HOST may be a name, IPv4 or [IPv6]); repeatable",
        parse_proxy_spec,
        (),
        multiple=True,
        metavar="SPEC",
    ),
    Option(
        "listen_host",
        ("--listen-host",),
        "address(es) the proxy listeners bind to; comma-separate several, e.g. 127.0.0.1,::1",
        parse_hosts,
        ("127.0.0.1",),
        metavar="HOST",
    ),
    Option(
        "admin_host",
        ("--admin-host",),
        "address(es) of the admin endpoint (/metrics, /healthz, /readyz); comma-separate several, e.g. 0.0.0.0,::",
        parse_hosts,
        ("127.0.0.1",),
        metavar="HOST",
    ),
    Option(
        "admin_port",
        ("--admin-port",),
        "port of the admin endpoint; 0 disables it",
        lambda v: 0 if str(v).strip() == "0" else parse_port(v),
        9898,
        metavar="PORT",
    ),
    Option(
        "drain_seconds",
        ("--drain-seconds",),
        "on SIGTERM/SIGINT, how long replies to requests in flight are still delivered before exit",
        non_negative_float("--drain-seconds"),
        15.0,
        metavar="N",
    ),
    Option(
        "max_message_bytes",
        ("--max-message-bytes",),
        "largest message observed; a longer header is a decode error (forwarding goes on)",
        positive_int("--max-message-bytes"),
        48_000_000,
        metavar="N",
    ),
    Option(
        "max_observed_compressed_bytes",
        ("--max-observed-compressed-bytes",),
        "snappy bodies up to this many compressed bytes are buffered and decompressed whole to be observed; "
        "larger ones are forwarded but not observed (decode error too_large_to_observe)",
        positive_int("--max-observed-compressed-bytes"),
        1_000_000,
        metavar="N",
    ),
    Option(
        "connect_timeout",
        ("--connect-timeout",),
        "seconds to wait for the upstream TCP connect; 0 waits as long as the kernel does (no timeout)",
        non_negative_float("--connect-timeout"),
        10.0,
        metavar="SECONDS",
    ),
    Option(
        "max_pending_requests",
        ("--max-pending-requests",),
        "requests awaiting a reply kept per connection; older ones are dropped and counted",
        positive_int("--max-pending-requests"),
        1000,
        metavar="N",
    ),
    Option(
        "verify_checksums",
        ("--verify-checksums",),
        "verify the CRC-32C of OP_MSG messages that carry one; "
        "mismatches are counted as decode errors (reason checksum_mismatch)",
        parse_bool,
        False,
        switch=True,
    ),
    LOG_LEVEL,
]


def _choice(value: str, flag: str, choices: Iterable[str]) -> str:
    v = str(value).strip().lower()
    choices = tuple(choices)
    if v not in choices:
        raise ConfigError(f"{flag} {value!r} is not valid: use one of {', '.join(choices)}")
    return v


def all_options() -> list[Option]:
    """Core options followed by each sink module's."""
    options = list(CORE_OPTIONS)
    for name in OPTION_MODULES:
        options.extend(getattr(importlib.import_module(name), "OPTIONS", ()))
    seen: set[str] = set()
    for o in options:
        if o.dest in seen:
            raise RuntimeError(f"option {o.dest} declared twice")
        seen.add(o.dest)
    return options


class Config(Mapping[str, Any]):
    """Frozen settings; read them as attributes (config.drain_seconds) or by key."""

    __slots__ = ("_values", "sources")

    def __init__(self, values: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> None:
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "sources", dict(sources or {}))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is frozen")

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def replace(self, **changes: Any) -> Config:
        """A copy with some values changed (tests, demo)."""
        values = dict(self._values)
        for k in changes:
            if k not in values:
                raise KeyError(k)
        values.update(changes)
        return Config(values, self.sources)

    def __repr__(self) -> str:
        return f"Config({self._values!r})"


def _split_list(raw: Any, separator: str | None = ",") -> list[str]:
    if isinstance(raw, (list, tuple)):
        return [str(x) for x in raw]
    return [p for p in (s.strip() for s in str(raw).split(separator)) if p]


def load_file(path: str) -> dict[str, Any]:
    """Read a TOML config file whose keys are option names (dashes or underscores)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist: check the --config path") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    return {k.replace("-", "_"): v for k, v in data.items()}


def build(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    file_values: Mapping[str, Any] | None = None,
    options: list[Option] | None = None,
) -> Config:
    """Resolve every option; `flags` holds raw strings (lists for repeatable) for the flags given."""
    options = all_options() if options is None else options
    flags = flags or {}
    env = os.environ if env is None else env
    file_values = dict(file_values or {})
    known = {o.dest for o in options}
    unknown = sorted(set(file_values) - known)
    if unknown:
        raise ConfigError(
            f"unknown setting(s) in config file: {', '.join(unknown)}; "
            f"valid names are the long flags without dashes, e.g. drain_seconds"
        )
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for o in options:
        if flags.get(o.dest) not in (None, [], ()):
            raw, source = flags[o.dest], o.flag
        elif o.env in env and env[o.env] != "":
            raw, source = env[o.env], o.env
        elif o.dest in file_values:
            raw, source = file_values[o.dest], "config file"
        else:
            values[o.dest], sources[o.dest] = o.default, "default"
            continue
        try:
            if o.switch:
                values[o.dest] = raw if isinstance(raw, bool) else parse_bool(raw)
            elif o.multiple:
                values[o.dest] = tuple(o.parse(x) for x in _split_list(raw, o.separator))
            else:
                values[o.dest] = o.parse(raw)
        except ConfigError as exc:
            msg = str(exc)
            if source != o.flag and not msg.startswith(source):
                msg = f"{source}: {msg}"
            raise ConfigError(msg) from None
        sources[o.dest] = source
    return Config(values, sources)


def check_proxies(config: Config) -> None:
    """Cross-option checks for `run`: at least one listener, no duplicate ports."""
    if not config.proxy and not config.get("upstream"):
        raise ConfigError(
            "no listener: give at least one --proxy PORT:HOST:PORT or --upstream URI (or set MONGOPROXY_PROXY)"
        )
    seen: dict[int, str] = {}
    for spec in config.proxy:
        if spec.listen_port in seen:
            raise ConfigError(
                f"listen port {spec.listen_port} is used by both --proxy {seen[spec.listen_port]} "
                f"and --proxy {spec.text}: give each listener its own port"
            )
        seen[spec.listen_port] = spec.text
    if config.admin_port and config.admin_port in seen and set(config.admin_host) & set(config.listen_host):
        raise ConfigError(f"--admin-port {config.admin_port} is also a proxy listen port: choose another admin port")
