"""Filters: which recorded operations to replay (the destructive-command denylist, --read-only, --include-ns,
--exclude-ns, --ops)."""

from __future__ import annotations

import dataclasses

from mongoproxy.errors import ReplayError
from mongoproxy.protocol.commands import DESTRUCTIVE_COMMANDS, READ_ONLY_COMMANDS, pipeline_writes
from mongoproxy.replay.model import SKIP_DESTRUCTIVE, SKIP_FILTERED, Op, Workload

# --read-only keeps READ_ONLY_COMMANDS (aggregate only without $out/$merge); DESTRUCTIVE_COMMANDS are not
# replayed unless --allow-destructive. Both live in the command-classification table.


@dataclasses.dataclass(frozen=True)
class Filters:
    """What to replay: --allow-destructive, --read-only, --include-ns/--exclude-ns, --ops."""

    read_only: bool = False
    include_ns: tuple = ()
    exclude_ns: tuple = ()
    ops: tuple = ()
    allow_destructive: bool = False

    def describe(self) -> str:
        """The filters as flags."""
        parts = []
        if self.allow_destructive:
            parts.append("--allow-destructive")
        if self.read_only:
            parts.append("--read-only")
        if self.include_ns:
            parts.append("--include-ns " + ",".join(self.include_ns))
        if self.exclude_ns:
            parts.append("--exclude-ns " + ",".join(self.exclude_ns))
        if self.ops:
            parts.append("--ops " + ",".join(self.ops))
        return " ".join(parts)


def _ns_match(patterns: tuple, db: str, coll: str) -> bool:
    for p in patterns:
        if p.endswith(".*"):
            if db == p[:-2]:
                return True
        elif "." in p:
            if coll and f"{db}.{coll}" == p:
                return True
        elif db == p:
            return True
    return False


class StreamFilter:
    """Applies Filters to ops one at a time (marking op.skip), and at the end says when nothing was left."""

    def __init__(self, filters: Filters, files: list) -> None:
        self.filters = filters
        self.files = files
        self.include_ops = {o.lower() for o in filters.ops if not o.startswith("!")}
        self.exclude_ops = {o[1:].lower() for o in filters.ops if o.startswith("!")}
        self.candidates = 0
        self.kept = 0
        self.denied: dict[str, int] = {}
        self.ops_seen: set[str] = set()
        self.ns_seen: set[str] = set()

    def __call__(self, o: Op) -> None:
        """Mark o.skip when the filters leave o out."""
        if o.skip:
            return
        f = self.filters
        key = o.key
        if not f.allow_destructive and key in DESTRUCTIVE_COMMANDS:
            o.skip = SKIP_DESTRUCTIVE
            self.denied[o.op] = self.denied.get(o.op, 0) + 1
            return
        self.candidates += 1
        if len(self.ops_seen) < 1000:
            self.ops_seen.add(o.op)
        if o.ns and len(self.ns_seen) < 1000:
            self.ns_seen.add(o.ns)
        keep = True
        if f.read_only and (
            key not in READ_ONLY_COMMANDS or (key == "aggregate" and pipeline_writes((o.spec or {}).get("pipeline")))
        ):
            keep = False
        elif self.include_ops and key not in self.include_ops:
            keep = False
        elif key in self.exclude_ops:
            keep = False
        elif f.include_ns and not _ns_match(f.include_ns, o.db, o.coll):
            keep = False
        elif f.exclude_ns and _ns_match(f.exclude_ns, o.db, o.coll):
            keep = False
        # A getMore or killCursors whose cursor's command is left out has nothing to continue.
        elif key in ("getmore", "killcursors") and o.creator is not None and o.creator.skip:
            keep = False
        if keep:
            self.kept += 1
        else:
            o.skip = SKIP_FILTERED

    def check(self, ops: int, warnings: list) -> None:
        """ReplayError when the filters (or the capture) leave nothing to replay."""
        if self.kept:
            return
        f = self.filters
        if self.candidates:
            ops_ = sorted(self.ops_seen)
            nss = sorted(self.ns_seen)
            raise ReplayError(
                f"the filters ({f.describe()}) match none of the {self.candidates} recorded "
                f"operations; they are {', '.join(ops_[:12])} on {', '.join(nss[:12])}"
            )
        if self.denied:
            n = sum(self.denied.values())
            names = ", ".join(sorted(self.denied))
            raise ReplayError(
                f"{', '.join(self.files)}: nothing to replay: {n} destructive admin "
                f"command{'s' if n > 1 else ''} ({names}) not sent without --allow-destructive, and "
                "the rest is handshake, monitoring or auth traffic"
            )
        why = (
            f"every MongoDB connection was skipped ({warnings[0]}"
            + (f"; {len(warnings) - 1} more warning(s)" if len(warnings) > 1 else "")
            + ")"
            if not ops and warnings
            else f"the capture holds only handshake, monitoring or auth traffic ({ops} commands)"
        )
        raise ReplayError(f"{', '.join(self.files)}: nothing to replay: {why}")


def apply_filters(workload: Workload, filters: Filters) -> None:
    """Mark ops the filters leave out; ReplayError when they leave nothing of what could be replayed."""
    f = StreamFilter(filters, workload.files)
    for o in workload.ops:
        f(o)
    f.check(len(workload.ops), workload.warnings)
