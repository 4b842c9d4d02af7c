"""Namespace filters as --log-ns and --record-ns take them: `db.collection`, `db.*` or `db`, comma-separated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mongoproxy.errors import ConfigError


def ns_list_parser(flag: str) -> Callable[[Any], tuple[str, ...]]:
    """An option parser for `flag` that checks each pattern names a database."""

    def parse(value: Any) -> tuple[str, ...]:
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        out = []
        for raw in items:
            ns = str(raw).strip()
            if not ns:
                continue
            if not ns.split(".", 1)[0]:
                raise ConfigError(f"{flag} {ns!r}: give db.collection, db.* or db, e.g. shop.orders,audit.*")
            out.append(ns)
        return tuple(out)

    return parse


class NamespaceFilter:
    """Matches (db, collection) against the patterns; false (as a whole) when there are none."""

    __slots__ = ("exact", "dbs")

    def __init__(self, patterns: tuple[str, ...] = ()) -> None:
        exact, dbs = set(), set()
        for ns in patterns:
            if ns.endswith(".*"):
                dbs.add(ns[:-2])
            elif "." in ns:
                exact.add(ns)
            else:
                dbs.add(ns)
        self.exact, self.dbs = frozenset(exact), frozenset(dbs)

    def __bool__(self) -> bool:
        return bool(self.exact or self.dbs)

    def __call__(self, db: str, collection: str) -> bool:
        return db in self.dbs or (bool(collection) and f"{db}.{collection}" in self.exact)
