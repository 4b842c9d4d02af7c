"""Fault injection for drills: command-aware rules that delay, fail, drop or throttle chosen commands.

Off unless --allow-faults. Rules come from --faults FILE (re-read on change
and on SIGHUP) and from the admin API (GET/POST /faults, DELETE
/faults/{name}, POST /faults/reset); `mongoproxy fault add|list|rm` talks to
the latter. See docs/drills.md.
"""

from __future__ import annotations

import os
from typing import Any

from mongoproxy.config import Option
from mongoproxy.errors import ConfigError
from mongoproxy.faults.engine import FaultEngine
from mongoproxy.faults.rules import Rule, RuleError, parse_rule

__all__ = ["FaultEngine", "Rule", "RuleError", "parse_rule", "create", "OPTIONS"]

G = "fault injection"
OPTIONS: list[Option] = [
    Option(
        "allow_faults",
        ("--allow-faults",),
        "allow fault injection rules (drills); without it the /faults admin API answers 403",
        switch=True,
        default=False,
        group=G,
    ),
    Option(
        "faults",
        ("--faults",),
        "fault rules file (TOML [[rule]] tables or a YAML list), re-read on change and on SIGHUP; needs --allow-faults",
        str,
        None,
        metavar="FILE",
        group=G,
    ),
]


def create(config: Any, registry: Any = None) -> FaultEngine:
    """The engine for this config; ConfigError (one line) for a rules file that cannot be used."""
    path = getattr(config, "faults", None)
    allowed = bool(getattr(config, "allow_faults", False))
    if path and not allowed:
        raise ConfigError(f"--faults {path} needs --allow-faults: fault injection is off unless explicitly allowed")
    if path and not os.path.isfile(path):
        raise ConfigError(f"--faults {path}: no such file; give the path of a TOML or YAML rules file")
    try:
        return FaultEngine(allowed, path, registry)
    except RuleError as exc:
        raise ConfigError(str(exc)) from None
