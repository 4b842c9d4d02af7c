"""The fault engine: the active rules, where they come from (file, admin API), and the per-command decision.

Invariants:
- With no live rule, `active` is False and no connection carries a gate: the data path is the plain one.
- A rule is applied to a connection only if its client and app could match (`could_match`); the rest
  of the matching happens per command, on gated connections only.
- `reload()` never raises: a rules file with an error keeps the previous rules and logs one line why.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

from mongoproxy.faults.rules import Rule, RuleError, load_rules_file, parse_rule

log = logging.getLogger("mongoproxy.faults")

POLL_SECONDS = 1.0
REPLYING_ACTIONS = frozenset(("error", "write_error"))  # how often the rules file's mtime is checked


class FaultEngine:
    """Rules, counters and the decision; one per proxy process."""

    name = "faults"

    def __init__(self, allowed: bool, path: str | None = None, registry: Any = None) -> None:
        self.allowed = allowed
        self.path = path
        self.rules: dict[str, Rule] = {}
        self.generation = 0  # bumped on every change, so gates re-check what could match
        self.proxy: Any = None
        self._random = random.Random()
        self._mtime: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self.file_error = ""
        self._counter = None
        if registry is not None:
            from prometheus_client import Counter

            self._counter = Counter(
                "mongoproxy_faults_injected",
                "Faults injected by drill rules (--allow-faults), by rule and action.",
                ["rule", "action"],
                registry=registry,
            )
        if path:
            self._load_file(initial=True)

    # ---- state ----

    @property
    def active(self) -> bool:
        """True while some rule may still inject."""
        now = time.time()
        return any(r.live(now) for r in self.rules.values())

    def add(self, rule: Rule) -> None:
        """Add a rule; RuleError when faults are not allowed or the name is taken."""
        if not self.allowed:
            raise RuleError("faults are disabled: start the proxy with --allow-faults (or MONGOPROXY_ALLOW_FAULTS=1)")
        if rule.name in self.rules:
            raise RuleError(f"rule {rule.name} exists: delete it first (mongoproxy fault rm {rule.name})")
        self.rules[rule.name] = rule
        log.warning("fault rule %s added (%s): %s", rule.name, rule.source, rule.spec)
        self._changed()

    def remove(self, name: str) -> bool:
        """Remove a rule by name; False when there is none."""
        rule = self.rules.pop(name, None)
        if rule is None:
            return False
        log.warning("fault rule %s removed after %d injection(s)", name, rule.injected)
        self._changed()
        return True

    def reset(self) -> int:
        """Remove every rule (file rules come back on the next reload); the number removed."""
        n = len(self.rules)
        self.rules.clear()
        if n:
            log.warning("fault rules reset: %d removed", n)
            self._changed()
        return n

    def _changed(self) -> None:
        self.generation += 1
        self._schedule_expiry()
        proxy = self.proxy
        if proxy is None or not self.active:
            return
        from mongoproxy.faults.gate import install

        for client in list(proxy.connections):
            install(self, client)

    def _schedule_expiry(self) -> None:
        # At the next expiry the generation moves on, so that gates drop off connections no rule can touch.
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        now = time.time()
        times = [r.expires for r in self.rules.values() if r.expires is not None and r.expires > now]
        if not times:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._expiry = loop.call_later(min(times) - now + 0.01, self._expired)

    def _expired(self) -> None:
        self._expiry = None
        self.generation += 1
        self._schedule_expiry()

    # ---- the decision (gated connections only) ----

    def could_match(self, client_ip: Any, app: str | None) -> bool:
        """Whether any live rule could apply to a connection from client_ip with this appName."""
        now = time.time()
        return any(r.live(now) and r.could_match(client_ip, app) for r in self.rules.values())

    def decide(
        self,
        client_ip: Any,
        app: str | None,
        op: str,
        db: str,
        coll: str,
        comment: str | None,
        shape: Callable,
        answerable: bool = True,
    ) -> Rule | None:
        """The rule to apply to this command (counted as injected), or None to forward it untouched.

        `answerable` is False for a request that expects no reply (moreToCome): no reply may be made up for it.
        """
        now = time.time()
        for rule in self.rules.values():
            if not rule.live(now) or not rule.could_match(client_ip, app) or (rule.app is not None and app is None):
                continue
            if not answerable and rule.action in REPLYING_ACTIONS:
                continue
            if not rule.matches(op, db, coll, comment, shape):
                continue
            if rule.percentage < 100 and self._random.random() * 100 >= rule.percentage:
                continue  # decided per command: the next rule may still apply
            rule.injected += 1
            if self._counter is not None:
                self._counter.labels(rule.name, rule.action).inc()
            if rule.max_count is not None and rule.injected >= rule.max_count:
                self.generation += 1
            return rule
        return None

    # ---- the rules file ----

    def _load_file(self, initial: bool = False) -> None:
        path = self.path or ""
        try:
            mtime = os.stat(path).st_mtime
        except OSError as exc:
            raise RuleError(f"cannot read rules file {path}: {exc.strerror}") from None
        rules = load_rules_file(path)
        if rules and not self.allowed:
            raise RuleError(f"rules file {path} has rules but faults are disabled: add --allow-faults")
        self._mtime = mtime
        old = {n: r for n, r in self.rules.items() if r.source == "file"}
        for name in old:
            del self.rules[name]
        for rule in rules:
            prev = old.get(rule.name)
            if prev is not None and prev.spec == rule.spec:
                rule.injected, rule.added, rule.expires = prev.injected, prev.added, prev.expires
            if rule.name in self.rules:
                raise RuleError(f"rules file {path}: rule {rule.name} is also defined through the admin API")
            self.rules[rule.name] = rule
        self.file_error = ""
        if not initial:
            log.warning("fault rules file %s loaded: %d rule(s)", path, len(rules))
            self._changed()

    def reload(self) -> None:
        """Re-read the rules file (SIGHUP); on an error keep the previous rules and log one line."""
        if not self.path:
            return
        snapshot = dict(self.rules)
        try:
            self._load_file()
        except RuleError as exc:
            self.rules = snapshot
            self.file_error = str(exc)
            log.error("%s; keeping the previous %d rule(s)", exc, len(snapshot))

    def _poll(self) -> None:
        self._timer = None
        try:
            mtime = os.stat(self.path or "").st_mtime
        except OSError:
            mtime = None
        if mtime is not None and mtime != self._mtime:
            self._mtime = mtime  # one attempt per change, even when the new content is wrong
            self.reload()
        self._timer = asyncio.get_running_loop().call_later(POLL_SECONDS, self._poll)

    # ---- wiring ----

    def attach(self, proxy: Any) -> None:
        """Bind to the running proxy: existing and future connections, the file poll timer."""
        self.proxy = proxy
        if self.path:
            self._timer = asyncio.get_running_loop().call_later(POLL_SECONDS, self._poll)
        self._schedule_expiry()
        if self.active:
            log.warning("fault injection active: %d rule(s): %s", len(self.rules), ", ".join(self.rules))

    def close(self) -> None:
        """Stop the timers."""
        for t in (self._timer, self._expiry):
            if t is not None:
                t.cancel()
        self._timer = self._expiry = None

    def add_raw(self, raw: Any) -> Rule:
        """Parse and add one flat rule (the admin API's POST)."""
        rule = parse_rule(raw)
        self.add(rule)
        return rule

    def listing(self) -> dict:
        """GET /faults: {"allowed", "rules": [...flat rules with injected...]}."""
        out: dict = {"allowed": self.allowed, "rules": [r.as_dict() for r in self.rules.values()]}
        if self.path:
            out["file"] = self.path
            if self.file_error:
                out["file_error"] = self.file_error
        return out

    def admin_routes(self) -> list:
        """GET/POST /faults, DELETE /faults/{name}, POST /faults/reset (aiohttp RouteDefs)."""
        from mongoproxy.faults.api import routes

        return routes(self)


def client_ip(host: str) -> Any:
    """The client's address as an ipaddress object, or None (a Unix socket, an odd peer name)."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
