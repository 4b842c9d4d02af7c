"""Rewrites between the recording and the target: cursor ids and logical session ids.

- Cursor ids are remapped in getMore and killCursors: recorded id -> the id the target returned to the
  command that opened the cursor (0 once closed).
- Every recorded lsid maps to one fresh session on the target, so retryable writes are not answered from an
  old session's cache; txnNumber is kept. pymongo binds a session to the client that started it, so the
  session lives on the client of the first recorded connection that used it, and every command carrying
  that lsid runs on that client.
"""

from __future__ import annotations

import threading
from typing import Any

from mongoproxy.replay.model import Op, Outcome


class CursorMap:
    """Recorded cursor id -> target cursor id (0: closed on the target)."""

    def __init__(self) -> None:
        self.ids: dict[int, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.ids)

    def rewrite(self, op: Op, spec: dict[str, Any]) -> bool:
        """Put the target's cursor ids into a getMore/killCursors spec; False when none is open on the target."""
        from bson import Int64

        if op.key == "getmore":
            target_id = self.ids.get(op.cursor_ref or 0)
            if not target_id:
                return False
            spec["getMore"] = Int64(target_id)
        elif op.key == "killcursors":
            ids = [Int64(self.ids[c]) for c in op.kill_ids if self.ids.get(c)]
            if not ids:
                return False
            spec["cursors"] = ids
        return True

    def update(self, op: Op, outcome: Outcome) -> None:
        """Learn from the target's reply: a cursor opened, continued or closed."""
        rec = op.recorded
        if rec is not None and rec.cursor_id is not None:
            # getMore: the cursor lives on until a reply says 0; other commands open recorded id -> target id.
            ref = op.cursor_ref if op.key == "getmore" else rec.cursor_id
            if ref:
                with self._lock:
                    self.ids[ref] = outcome.cursor_id or 0
        if op.key == "killcursors":
            with self._lock:
                for c in op.kill_ids:
                    self.ids[c] = 0


class SessionMap:
    """Recorded lsid -> (the client that owns it, a fresh pymongo ClientSession on that client)."""

    def __init__(self) -> None:
        self.sessions: dict[bytes, tuple[Any, Any]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.sessions)

    def get(self, lsid_key: bytes, client: Any) -> tuple[Any, Any]:
        """(client, session) for a recorded lsid; the first use starts the session on client."""
        with self._lock:
            got = self.sessions.get(lsid_key)
            if got is None:
                got = self.sessions[lsid_key] = (client, client.start_session(causal_consistency=False))
            return got

    def end(self) -> None:
        """End every session (before their clients close)."""
        with self._lock:
            sessions = list(self.sessions.values())  # kept: the report counts them
        for _, session in sessions:
            try:
                session.end_session()
            except Exception:  # noqa: BLE001 - ending is best effort; closing the client ends them anyway
                pass
