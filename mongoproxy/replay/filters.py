"""Filters: which recorded operations to replay (the destructive-command denylist, --read-only, --include-ns,
--exclude-ns, --ops)."""

from __future__ import annotations

import dataclasses

from mongoproxy.errors import ReplayError
from mongoproxy.protocol.commands import DESTRUCTIVE_COMMANDS, READ_ONLY_COMMANDS
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


def _is_write_aggregate(op: Op) -> bool:
    pipeline = (op.spec or {}).get("pipeline") or []
    for stage in pipeline:
        try:
            if "$out" in stage or "$merge" in stage:
                return True
        except TypeError:
            continue
    return False


def apply_filters(workload: Workload, filters: Filters) -> None:
    """Mark ops the filters leave out; ReplayError when they leave nothing of what could be replayed."""
    denied = [] if filters.allow_destructive else [o for o in workload.replayable() if o.key in DESTRUCTIVE_COMMANDS]
    for o in denied:
        o.skip = SKIP_DESTRUCTIVE
    candidates = workload.replayable()
    include_ops = {o.lower() for o in filters.ops if not o.startswith("!")}
    exclude_ops = {o[1:].lower() for o in filters.ops if o.startswith("!")}
    for o in candidates:
        key = o.key
        keep = True
        if filters.read_only and (key not in READ_ONLY_COMMANDS or (key == "aggregate" and _is_write_aggregate(o))):
            keep = False
        elif include_ops and key not in include_ops:
            keep = False
        elif key in exclude_ops:
            keep = False
        elif filters.include_ns and not _ns_match(filters.include_ns, o.db, o.coll):
            keep = False
        elif filters.exclude_ns and _ns_match(filters.exclude_ns, o.db, o.coll):
            keep = False
        if not keep:
            o.skip = SKIP_FILTERED
    # A getMore or killCursors whose cursor's command is left out has nothing to continue.
    for o in candidates:
        if not o.skip and o.key in ("getmore", "killcursors") and o.creator is not None and o.creator.skip:
            o.skip = SKIP_FILTERED
    if candidates and not workload.replayable():
        ops = sorted({o.op for o in candidates})
        nss = sorted({o.ns for o in candidates if o.ns})
        raise ReplayError(
            f"the filters ({filters.describe()}) match none of the {len(candidates)} recorded "
            f"operations; they are {', '.join(ops[:12])} on {', '.join(nss[:12])}"
        )
    if not candidates and denied:
        names = ", ".join(sorted({o.op for o in denied}))
        raise ReplayError(
            f"{', '.join(workload.files)}: nothing to replay: {len(denied)} destructive admin "
            f"command{'s' if len(denied) > 1 else ''} ({names}) not sent without --allow-destructive, and "
            "the rest is handshake, monitoring or auth traffic"
        )
    if not candidates:
        why = (
            f"every MongoDB connection was skipped ({workload.warnings[0]}"
            + (f"; {len(workload.warnings) - 1} more warning(s)" if len(workload.warnings) > 1 else "")
            + ")"
            if not workload.ops and workload.warnings
            else f"the capture holds only handshake, monitoring or auth traffic ({len(workload.ops)} commands)"
        )
        raise ReplayError(f"{', '.join(workload.files)}: nothing to replay: {why}")
