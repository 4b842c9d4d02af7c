"""Fault rules: one flat format for the rules file, POST /faults and GET /faults; validation with one-line reasons.

A rule is a flat mapping: `name`, the match keys (`op`, `ns`, `app`, `client`,
`shape`, `comment`), the limits (`percentage`, `max_count`, `duration`,
`until`), an `action` and that action's parameters. Parsing never accepts a
key it does not understand, or a parameter of another action, so a typo
cannot turn a drill into something else.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import ipaddress
import re
import time
from dataclasses import dataclass, field
from typing import Any

from mongoproxy.errors import MongoProxyError
from mongoproxy.protocol.builders import code_name
from mongoproxy.protocol.commands import AUTH_COMMANDS, HELLO_COMMANDS

ACTIONS = ("delay", "error", "write_error", "close", "blackhole", "throttle")
MATCH_KEYS = ("op", "ns", "app", "client", "shape", "comment")
LIMIT_KEYS = ("percentage", "max_count", "duration", "until")
# The parameters each action takes; any other parameter is a mistake.
ACTION_PARAMS: dict[str, tuple[str, ...]] = {
    "delay": ("ms", "jitter_ms", "where"),
    "error": ("code", "errmsg", "labels"),
    "write_error": ("code", "errmsg"),
    "close": ("after_ms",),
    "blackhole": (),
    "throttle": ("bytes_per_second",),
}
ALL_PARAMS = ("ms", "jitter_ms", "where", "code", "errmsg", "labels", "after_ms", "bytes_per_second")
KEYS = ("name", *MATCH_KEYS, *LIMIT_KEYS, "action", *ALL_PARAMS)
# Handshake commands (HELLO_COMMANDS) are never faulted unless a rule names them in `op`; authentication
# (AUTH_COMMANDS) never is, whatever a rule says: a drill must not lock anyone out.

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class RuleError(MongoProxyError):
    """A rule that cannot be used; the message is one line naming the fix."""


def parse_duration(value: Any, what: str = "duration") -> float:
    """Seconds from `90`, `"30s"`, `"10m"`, `"1h"` or `"500ms"`."""
    if isinstance(value, bool):
        raise RuleError(f"{what} {value!r} is not a duration: give e.g. 30s, 10m or 1h")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value).strip())
        if not m:
            raise RuleError(f"{what} {value!r} is not a duration: give e.g. 30s, 10m or 1h")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not seconds > 0:
        raise RuleError(f"{what} must be positive, got {value!r}")
    return seconds


def _parse_until(value: Any) -> float:
    if isinstance(value, dt.datetime):
        when = value
    else:
        try:
            when = dt.datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
        except ValueError:
            raise RuleError(f"until {value!r} is not a time: give ISO 8601, e.g. 2026-12-01T18:00:00Z") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _number(rule: str, key: str, value: Any, lo: float, hi: float | None = None, integer: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(str(value).strip()) if not integer else int(str(value).strip())
        except ValueError:
            raise RuleError(f"rule {rule}: {key} {value!r} is not a number") from None
    if integer and value != int(value):
        raise RuleError(f"rule {rule}: {key} must be a whole number, got {value!r}")
    if not (value >= lo and (hi is None or value <= hi)):
        bounds = f"from {lo:g} to {hi:g}" if hi is not None else f"at least {lo:g}"
        raise RuleError(f"rule {rule}: {key} must be {bounds}, got {value!r}")
    return int(value) if integer else float(value)


def _strings(rule: str, key: str, value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) and x.strip() for x in items):
        raise RuleError(f"rule {rule}: {key} must be a non-empty string or a list of them, got {value!r}")
    out: list[str] = []
    for x in items:
        out.extend(p.strip() for p in x.split(",") if p.strip())
    return tuple(out)


@dataclass(eq=False)
class Rule:
    """One validated rule, with its counters."""

    name: str
    action: str
    spec: dict  # the flat form, as given (normalised), for GET /faults
    ops: frozenset = frozenset()  # lower-case names a command must have; empty: any
    not_ops: frozenset = frozenset()
    ns: tuple = ()
    app: str | None = None
    client: Any = None  # ipaddress network
    shape: str | None = None
    comment: str | None = None
    percentage: float = 100.0
    max_count: int | None = None
    expires: float | None = None  # time.time() after which the rule no longer applies
    ms: float = 0.0
    jitter_ms: float = 0.0
    where: str = "request"
    code: int = 0
    errmsg: str = ""
    labels: tuple = ()
    after_ms: float = 0.0
    bytes_per_second: int = 0
    source: str = "api"
    injected: int = 0
    added: float = field(default_factory=time.time)

    @property
    def names_hello(self) -> bool:
        """True when the rule names a handshake command explicitly."""
        return bool(self.ops & HELLO_COMMANDS)

    def live(self, now: float) -> bool:
        """Still allowed to inject: neither expired nor used up."""
        if self.expires is not None and now >= self.expires:
            return False
        return self.max_count is None or self.injected < self.max_count

    def could_match(self, client_ip: Any, app: str | None) -> bool:
        """Whether a connection from client_ip with appName `app` (None: not known yet) could ever match."""
        if self.client is not None and (client_ip is None or client_ip not in self.client):
            return False
        return self.app is None or app is None or fnmatch.fnmatchcase(app, self.app)

    def matches(self, op: str, db: str, coll: str, comment: str | None, shape: Any) -> bool:
        """The command-level keys (op, ns, comment, shape); connection keys are checked by could_match."""
        lop = op.lower()
        if lop in AUTH_COMMANDS:
            return False
        if self.ops:
            if lop not in self.ops:
                return False
        elif lop in HELLO_COMMANDS:
            return False
        if lop in self.not_ops:
            return False
        if self.ns:
            full = f"{db}.{coll}" if coll else db
            if not any(fnmatch.fnmatchcase(full, p) or (p.endswith(".*") and db == p[:-2]) for p in self.ns):
                return False
        if self.comment is not None and (comment is None or self.comment not in comment):
            return False
        return self.shape is None or shape() == self.shape

    def as_dict(self) -> dict:
        """The flat form with the injected count, as GET /faults shows it."""
        out = dict(self.spec)
        out["injected"] = self.injected
        out["active"] = self.live(time.time())
        return out


def parse_rule(raw: Any, source: str = "api") -> Rule:
    """Validate one flat rule mapping; RuleError with a one-line reason."""
    if not isinstance(raw, dict):
        raise RuleError(f"a rule must be an object of keys (name, action, ...), got {type(raw).__name__}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise RuleError(f"rule name {name!r} is missing or not valid: use letters, digits, '.', '_' or '-'")
    unknown = [k for k in raw if k not in KEYS]
    if unknown:
        raise RuleError(f"rule {name}: unknown key {unknown[0]!r}; valid keys are {', '.join(KEYS)}")
    action = raw.get("action")
    if action not in ACTIONS:
        raise RuleError(f"rule {name}: action {action!r} is not known: use one of {', '.join(ACTIONS)}")
    stray = [k for k in ALL_PARAMS if k in raw and k not in ACTION_PARAMS[action]]
    if stray:
        takes = ", ".join(ACTION_PARAMS[action]) or "no parameters"
        raise RuleError(f"rule {name}: {stray[0]} does not apply to action {action} (it takes {takes})")
    rule = Rule(name=name, action=action, spec={}, source=source)
    spec: dict = {"name": name}
    if "op" in raw:
        ops = _strings(name, "op", raw["op"])
        rule.ops = frozenset(o.lower() for o in ops if not o.startswith("!"))
        rule.not_ops = frozenset(o[1:].lower() for o in ops if o.startswith("!"))
        if "" in rule.not_ops:
            raise RuleError(f"rule {name}: op '!' names no command")
        spec["op"] = list(ops) if len(ops) != 1 else ops[0]
    if "ns" in raw:
        rule.ns = _strings(name, "ns", raw["ns"])
        if any(not p.split(".", 1)[0] for p in rule.ns):
            raise RuleError(f"rule {name}: ns {raw['ns']!r}: give db.collection, db.* or db")
        spec["ns"] = list(rule.ns) if len(rule.ns) != 1 else rule.ns[0]
    for key in ("app", "shape", "comment"):
        if key in raw:
            if not isinstance(raw[key], str) or not raw[key]:
                raise RuleError(f"rule {name}: {key} must be a non-empty string, got {raw[key]!r}")
            setattr(rule, key, raw[key])
            spec[key] = raw[key]
    if "client" in raw:
        try:
            rule.client = ipaddress.ip_network(str(raw["client"]).strip(), strict=False)
        except ValueError:
            raise RuleError(
                f"rule {name}: client {raw['client']!r} is not a CIDR: give e.g. 10.1.0.0/16 or 127.0.0.1/32"
            ) from None
        spec["client"] = str(rule.client)
    if "percentage" in raw:
        rule.percentage = _number(name, "percentage", raw["percentage"], 0, 100)
        spec["percentage"] = raw["percentage"]
    if "max_count" in raw:
        rule.max_count = _number(name, "max_count", raw["max_count"], 1, integer=True)
        spec["max_count"] = rule.max_count
    if "duration" in raw and "until" in raw:
        raise RuleError(f"rule {name}: give duration or until, not both")
    if "duration" in raw:
        try:
            rule.expires = rule.added + parse_duration(raw["duration"])
        except RuleError as exc:
            raise RuleError(f"rule {name}: {exc}") from None
        spec["duration"] = raw["duration"]
    if "until" in raw:
        try:
            rule.expires = _parse_until(raw["until"])
        except RuleError as exc:
            raise RuleError(f"rule {name}: {exc}") from None
        spec["until"] = dt.datetime.fromtimestamp(rule.expires, dt.UTC).isoformat().replace("+00:00", "Z")
    spec["action"] = action
    _parse_params(rule, raw, spec)
    rule.spec = spec
    return rule


def _parse_params(rule: Rule, raw: dict, spec: dict) -> None:
    name, action = rule.name, rule.action
    if action == "delay":
        if "ms" not in raw:
            raise RuleError(f"rule {name}: action delay needs ms, e.g. ms = 300")
        rule.ms = _number(name, "ms", raw["ms"], 0, 3_600_000)
        rule.jitter_ms = _number(name, "jitter_ms", raw.get("jitter_ms", 0), 0, 3_600_000)
        rule.where = raw.get("where", "request")
        if rule.where not in ("request", "reply"):
            raise RuleError(f"rule {name}: where {rule.where!r} is not valid: use request or reply")
    elif action in ("error", "write_error"):
        if action == "error" and "code" not in raw:
            raise RuleError(f"rule {name}: action error needs code, e.g. code = 91 (ShutdownInProgress)")
        rule.code = _number(name, "code", raw.get("code", 11000), -(2**31), 2**31 - 1, integer=True)
        errmsg = raw.get("errmsg")
        if errmsg is not None and not isinstance(errmsg, str):
            raise RuleError(f"rule {name}: errmsg must be a string")
        label = code_name(rule.code) or f"error {rule.code}"
        rule.errmsg = errmsg or f"{label} (injected by mongoproxy fault rule {name})"
        if "labels" in raw:
            rule.labels = _strings(name, "labels", raw["labels"])
    elif action == "close":
        rule.after_ms = _number(name, "after_ms", raw.get("after_ms", 0), 0, 3_600_000)
    elif action == "throttle":
        if "bytes_per_second" not in raw:
            raise RuleError(f"rule {name}: action throttle needs bytes_per_second, e.g. bytes_per_second = 10000")
        rule.bytes_per_second = _number(name, "bytes_per_second", raw["bytes_per_second"], 1, integer=True)
    for key in ACTION_PARAMS[action]:
        if key in raw:
            spec[key] = list(rule.labels) if key == "labels" else raw[key]


def load_rules_file(path: str) -> list[Rule]:
    """Rules from a TOML file (`[[rule]]` tables) or a YAML file (a list); RuleError naming the problem."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise RuleError(f"cannot read rules file {path}: {exc.strerror}") from None
    if path.endswith((".yaml", ".yml")):
        from ruamel.yaml import YAML, YAMLError

        try:
            items = YAML(typ="safe", pure=True).load(data)
        except YAMLError as exc:
            raise RuleError(f"rules file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        items = [] if items is None else items
        if isinstance(items, dict) and "rule" in items:
            items = items["rule"]
        if not isinstance(items, list):
            raise RuleError(f"rules file {path}: expected a YAML list of rules")
    else:
        import tomllib

        try:
            doc = tomllib.loads(data.decode("utf-8", "replace"))
        except tomllib.TOMLDecodeError as exc:
            raise RuleError(f"rules file {path} is not valid TOML: {exc}") from None
        extra = [k for k in doc if k != "rule"]
        if extra:
            raise RuleError(f"rules file {path}: unknown table {extra[0]!r}; write each rule as a [[rule]] table")
        items = doc.get("rule", [])
    rules: list[Rule] = []
    seen: set[str] = set()
    for raw in items:
        try:
            rule = parse_rule(raw, source="file")
        except RuleError as exc:
            raise RuleError(f"rules file {path}: {exc}") from None
        if rule.name in seen:
            raise RuleError(f"rules file {path}: rule {rule.name} appears twice")
        seen.add(rule.name)
        rules.append(rule)
    return rules
