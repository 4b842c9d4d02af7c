"""Injection settings: InjectOptions, the value parsers, the SETTINGS table (flags, webhook config) and per-pod annotation overrides."""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from mongoproxy.errors import ConfigError
from mongoproxy.inject.names import (
    ANN_ADMIN_PORT,
    ANN_CPU_LIMIT,
    ANN_CPU_REQUEST,
    ANN_DRAIN_SECONDS,
    ANN_IMAGE,
    ANN_LOG_COMMANDS,
    ANN_MEMORY_LIMIT,
    ANN_MEMORY_REQUEST,
    ANN_METRIC_LABELS,
    ANN_MONGO_PORTS,
    ANN_PROXY_ARGS,
    ANN_PROXY_PORT,
    ANN_TLS_SECRET,
    ANN_TLS_UPSTREAM_CA,
    DEFAULT_IMAGE,
)
from mongoproxy.iptables import parse_port_list, parse_uid, port_in

# Flags of `mongoproxy run` that inject itself sets; extra proxy args may not repeat them.
OWNED_RUN_FLAGS = {
    "--proxy": "--proxy-port",
    "--listen-host": "--ipv6",
    "--admin-host": "(none: the admin endpoint must listen on the pod IP for probes and scraping)",
    "--admin-port": "--admin-port",
    "--drain-seconds": f"the annotation {ANN_DRAIN_SECONDS}",
}


@dataclass(frozen=True)
class InjectOptions:
    """Settings from the command line; pod annotations may override the ports, drain and extra args."""

    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    mongo_ports: tuple[str, ...] = ("27017",)
    proxy_port: int = 27111
    admin_port: int = 9898
    proxy_uid: int = 9999
    legacy_sidecar: bool = False
    ipv6: bool = False
    iptables_backend: str = "auto"
    proxy_args: tuple[str, ...] = ()
    drain_seconds: int | None = None  # None: derived from terminationGracePeriodSeconds
    cpu_request: str = "50m"
    memory_request: str = "64Mi"
    cpu_limit: str = "1"
    memory_limit: str = "256Mi"
    metric_labels: str | None = None  # None: the proxy's default label set
    log_commands: bool = False
    tls_secret: str | None = None  # a kubernetes.io/tls Secret mounted at TLS_DIR for the listener
    tls_upstream_ca: bool = False  # the Secret's ca.crt verifies the servers (--upstream-tls)


class AnnotationError(ConfigError):
    """A pod's mongoproxy.io/* annotation has a value that cannot be used; `annotation` names it."""

    def __init__(self, annotation: str, message: str) -> None:
        super().__init__(message)
        self.annotation = annotation


# ---- values ----


def _port(value: Any, where: str) -> int:
    text = str(value).strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(f"{where} {value!r} is not a port: use an integer from 1 to 65535")
    return int(text)


_QUANTITY = re.compile(r"(\d+(\.\d+)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")


def parse_quantity(value: Any, where: str) -> str:
    """A Kubernetes resource quantity such as 50m, 1, 0.5 or 256Mi."""
    text = str(value).strip()
    if not _QUANTITY.fullmatch(text):
        raise ConfigError(f"{where} {value!r} is not a Kubernetes quantity: use e.g. 100m, 0.5, 128Mi or 1Gi")
    return text


def parse_image(value: Any, where: str = "--image") -> str:
    """An image reference without spaces."""
    image = str(value).strip()
    if not image or any(ch.isspace() for ch in image):
        raise ConfigError(f"{where} {value!r} is not an image reference: give e.g. registry/mongoproxy:0.1.0")
    return image


def parse_switch(value: Any, where: str) -> bool:
    """true/false (also yes/no, on/off, 1/0)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ConfigError(f'{where} {value!r} is not valid: use "true" or "false"')


def _secret_name(value: Any, where: str) -> str | None:
    """A Secret's name; empty means none (an annotation may turn off a ConfigMap's default)."""
    if value is None:
        return None
    name = str(value).strip()
    if not name:
        return None
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", name):
        raise ConfigError(f"{where} {value!r} is not a Secret name: lower-case letters, digits, '-' and '.'")
    return name


def parse_labels(value: Any, where: str) -> str:
    """Metric labels for the proxy's --metric-labels, checked by the metrics sink's own parser."""
    from mongoproxy.sinks.metrics import parse_metric_labels

    try:
        return ",".join(parse_metric_labels(value))
    except ConfigError as exc:
        reason = str(exc).removeprefix("--metric-labels: ").removeprefix("--metric-labels ")
        raise ConfigError(f"{where} {value!r}: {reason}") from None


def check_proxy_args(args: Iterable[str], where: str = "--proxy-args") -> tuple[str, ...]:
    """Extra `mongoproxy run` arguments: every flag must exist and must not be one inject sets."""
    from mongoproxy import config as config_mod

    known = {flag for o in config_mod.all_options() for flag in o.flags} | {"--config"}
    args = tuple(args)
    for token in args:
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        if name in OWNED_RUN_FLAGS:
            raise ConfigError(f"{where}: {name} is set by mongoproxy inject; use {OWNED_RUN_FLAGS[name]} instead")
        if name not in known:
            raise ConfigError(f"{where}: {name} is not a flag of 'mongoproxy run': see 'mongoproxy run --help'")
    return args


def split_proxy_args(text: str, where: str = "--proxy-args") -> tuple[str, ...]:
    """Shell-split one string of extra proxy arguments."""
    try:
        return tuple(shlex.split(text))
    except ValueError as exc:
        raise ConfigError(f"{where} {text!r}: {exc}: quote it like a shell command line") from None


def _drain(value: Any, where: str) -> int:
    text = str(value).strip()
    if not text.isdigit():
        raise ConfigError(f'{where} {text!r} is not a whole number of seconds, e.g. "10"')
    return int(text)


def _extra_args(opts: InjectOptions, value: Any, where: str) -> tuple[str, ...]:
    return opts.proxy_args + check_proxy_args(split_proxy_args(str(value), where), where)


# Per-pod overrides: annotation -> (InjectOptions field, parse(value, where), or parse(opts, value, where)).
# Each annotation is named like the `inject` flag it overrides. A new setting is one row here.
ANNOTATION_OVERRIDES: dict[str, tuple[str, Any]] = {
    ANN_IMAGE: ("image", parse_image),
    ANN_MONGO_PORTS: ("mongo_ports", parse_port_list),
    ANN_PROXY_PORT: ("proxy_port", lambda v, w: _port(v, w)),
    ANN_ADMIN_PORT: ("admin_port", lambda v, w: _port(v, w)),
    ANN_DRAIN_SECONDS: ("drain_seconds", _drain),
    ANN_CPU_REQUEST: ("cpu_request", parse_quantity),
    ANN_MEMORY_REQUEST: ("memory_request", parse_quantity),
    ANN_CPU_LIMIT: ("cpu_limit", parse_quantity),
    ANN_MEMORY_LIMIT: ("memory_limit", parse_quantity),
    ANN_METRIC_LABELS: ("metric_labels", parse_labels),
    ANN_LOG_COMMANDS: ("log_commands", parse_switch),
    ANN_TLS_SECRET: ("tls_secret", _secret_name),
    ANN_TLS_UPSTREAM_CA: ("tls_upstream_ca", parse_switch),
    ANN_PROXY_ARGS: ("proxy_args", None),  # added to the flag's arguments, not replacing them
}


def _effective_options(opts: InjectOptions, annotations: dict, where: str) -> InjectOptions:
    """Command-line options with this pod's mongoproxy.io/* overrides applied; AnnotationError names a bad one."""
    changes: dict[str, Any] = {}
    for key, (attr, parse) in ANNOTATION_OVERRIDES.items():
        if key not in annotations:
            continue
        try:
            if parse is None:
                changes[attr] = _extra_args(opts, annotations[key], f"{where}: {key}")
            else:
                changes[attr] = parse(annotations[key], f"{where}: {key}")
        except AnnotationError:
            raise
        except ConfigError as exc:
            raise AnnotationError(key, str(exc)) from None
    if not changes:
        return opts
    opts = replace(opts, **changes)
    if opts.tls_upstream_ca and not opts.tls_secret:
        key = ANN_TLS_UPSTREAM_CA if "tls_upstream_ca" in changes else ANN_TLS_SECRET
        raise AnnotationError(key, f"{where}: {key}: {_TLS_UPSTREAM_CA_NEEDS_SECRET}")
    return opts


def _check_ports(opts: InjectOptions, where: str) -> None:
    if opts.proxy_port == opts.admin_port:
        raise ConfigError(
            f"{where}: proxy port and admin port are both {opts.proxy_port}: give them different "
            "ports (--proxy-port, --admin-port)"
        )
    if port_in(opts.proxy_port, opts.mongo_ports):
        raise ConfigError(
            f"{where}: proxy port {opts.proxy_port} is one of the MongoDB ports "
            f"{','.join(opts.mongo_ports)}: choose another --proxy-port"
        )
    if port_in(opts.admin_port, opts.mongo_ports):
        raise ConfigError(
            f"{where}: admin port {opts.admin_port} is one of the MongoDB ports "
            f"{','.join(opts.mongo_ports)}: choose another --admin-port"
        )


def _proxy_args(value: Any, where: str) -> tuple[str, ...]:
    # One shell-quoted string, or a list of them (the repeatable flag; a TOML array).
    texts = [value] if isinstance(value, str) else list(value or ())
    extra: tuple[str, ...] = ()
    for text in texts:
        extra += split_proxy_args(str(text), where)
    return check_proxy_args(extra, where)


def _choice(choices: tuple[str, ...]):
    def parse(value: Any, where: str) -> str:
        if str(value) not in choices:
            raise ConfigError(f"{where} {value!r} is not valid: use one of {', '.join(choices)}")
        return str(value)

    return parse


# Injection settings by name (the flags of `inject` with underscores): parse(value, flag). The webhook's
# --config file and ConfigMap use the same names, so `inject` and the webhook read defaults one way.
SETTINGS: dict[str, Any] = {
    "image": parse_image,
    "image_pull_policy": _choice(("Always", "IfNotPresent", "Never")),
    "mongo_ports": parse_port_list,
    "proxy_port": _port,
    "admin_port": _port,
    "proxy_uid": lambda v, w: parse_uid(str(v)),
    "legacy_sidecar": parse_switch,
    "ipv6": parse_switch,
    "iptables_backend": _choice(("auto", "nft", "legacy")),
    "proxy_args": _proxy_args,
    "cpu_request": parse_quantity,
    "memory_request": parse_quantity,
    "cpu_limit": parse_quantity,
    "memory_limit": parse_quantity,
    "metric_labels": parse_labels,
    "log_commands": parse_switch,
    "tls_secret": _secret_name,
    "tls_upstream_ca": parse_switch,
}
_TLS_UPSTREAM_CA_NEEDS_SECRET = "--tls-upstream-ca uses the ca.crt of --tls-secret: give --tls-secret NAME"


def options_from_settings(values: dict[str, Any], source: str = "") -> InjectOptions:
    """InjectOptions from raw settings named like the flags (TOML values or strings); ConfigError names the fix."""
    prefix = f"{source}: " if source else ""
    unknown = sorted(set(values) - set(SETTINGS))
    if unknown:
        raise ConfigError(
            f"{prefix}unknown injection setting(s) {', '.join(unknown)}: valid names are {', '.join(SETTINGS)}"
        )
    parsed: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        try:
            parsed[name] = SETTINGS[name](value, flag)
        except ConfigError as exc:
            raise ConfigError(f"{prefix}{exc}") from None
    opts = InjectOptions(**parsed)
    _check_ports(opts, source or "flags")
    if opts.tls_upstream_ca and not opts.tls_secret:
        raise ConfigError(f"{prefix}{_TLS_UPSTREAM_CA_NEEDS_SECRET}")
    return opts


def options_from_args(args: argparse.Namespace) -> InjectOptions:
    """InjectOptions from parsed flags; ConfigError names the fix."""
    return options_from_settings({name: getattr(args, name, None) for name in SETTINGS})
