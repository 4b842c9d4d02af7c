"""Process signals: SIGTERM/SIGINT drain then exit, SIGHUP reloads what can be reloaded and never exits.

Reload contract: every sink on the bus and every object in `proxy.components` (the admin server included)
that defines `reload() -> None` is called. A reload must not raise; if one does, it is logged on one line
and the others still run. The command log reopens its file there (log rotation), the admin server re-reads
its token and TLS files, and components that watch files (rules, certificates) re-read them.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from typing import Any

log = logging.getLogger("mongoproxy")


def reload_all(proxy: Any) -> int:
    """Call reload() on every sink and component; the number of reloads that ran without raising."""
    done = 0
    for owner in [*getattr(proxy.bus, "sinks", ()), *getattr(proxy, "components", ())]:
        reload = getattr(owner, "reload", None)
        if not callable(reload):
            continue
        name = getattr(owner, "name", type(owner).__name__)
        try:
            reload()
            done += 1
        except Exception as exc:  # noqa: BLE001 - a failed reload keeps the old state and never stops the proxy
            log.warning("SIGHUP: reloading %s failed (%r): it keeps its previous state", name, exc)
    return done


def ignore_hangup() -> None:
    """Until the loop's handler is installed, SIGHUP must not kill the process (its default action)."""
    if hasattr(signal, "SIGHUP"):
        try:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        except ValueError:  # not the main thread: the caller owns the signals
            pass


def install(loop: Any, proxy: Any, on_stop: Callable[[str], None]) -> list[signal.Signals]:
    """SIGTERM/SIGINT call on_stop(name); SIGHUP reloads. The signals handled, for remove()."""
    sigs: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig.name)
        sigs.append(sig)
    if hasattr(signal, "SIGHUP"):

        def hangup() -> None:
            n = reload_all(proxy)
            log.info("SIGHUP received: %d component(s) reloaded", n)

        loop.add_signal_handler(signal.SIGHUP, hangup)
        sigs.append(signal.SIGHUP)
    return sigs


def remove(loop: Any, sigs: list[signal.Signals]) -> None:
    """Undo install(); SIGHUP stays ignored until the process exits."""
    for sig in sigs:
        loop.remove_signal_handler(sig)
    ignore_hangup()
