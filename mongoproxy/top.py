"""`mongoproxy top`: the query digests of one or several proxies, merged, as a live terminal table.

Each refresh fetches GET /digest?sketch=1 from every --admin URL and merges the documents (mongoproxy.digest: counts
add up and the latency sketches merge bin by bin, so merged percentiles are those of the union). On a terminal it is a
rich live view driven by keys; otherwise it prints a plain table every --interval seconds; `--once [--json]` prints
one merged table (or the merged JSON document, same schema as GET /digest) and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from mongoproxy import digestview
from mongoproxy.digest import SORTS, Digest
from mongoproxy.errors import MongoProxyError

DEFAULT_ADMIN = "http://127.0.0.1:9898"
HELP = "t/p/c/e sort by total time, p99, count, errors · ↑↓ select · enter example · n namespace · a app · r reset · q quit"


def add_parser(sub: Any) -> None:
    """Register `mongoproxy top`."""
    p = sub.add_parser(
        "top",
        help="live table of the query digest of one or several proxies",
        description="Show which query shapes cost the most right now, from the digests of one or several "
        "proxies (merged). Keys: " + HELP + ".",
    )
    p.add_argument(
        "--admin",
        action="append",
        metavar="URL",
        help=f"admin endpoint of a proxy; repeat for several, their digests are merged (default: {DEFAULT_ADMIN})",
    )
    p.add_argument("--admin-token-file", metavar="PATH", help="file holding the admin bearer token")
    p.add_argument("--sort", choices=list(SORTS), default="total_time", help="initial sort (default: total_time)")
    p.add_argument("--limit", type=int, default=50, help="shapes shown (default: 50)")
    p.add_argument("--ns", action="append", default=[], help="only these namespaces: db.collection, db.* or db")
    p.add_argument("--app", help="only this client application name")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default: 1)")
    p.add_argument("--count", type=int, default=0, help="without a terminal: stop after this many tables (0: never)")
    p.add_argument("--once", action="store_true", help="print one table (or --json document) and exit")
    p.add_argument("--json", action="store_true", help="with --once: the merged digest as JSON (GET /digest schema)")
    p.set_defaults(func=main)


class Sources:
    """The proxies' admin endpoints: fetch and merge their digests, reset them."""

    def __init__(self, urls: list[str], token: str | None) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.token = token

    def _request(self, url: str, method: str = "GET") -> bytes:
        req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.read()

    def merged(self) -> Digest:
        """One Digest holding every proxy's; MongoProxyError names an unreachable or odd endpoint."""
        merged = Digest()
        for base in self.urls:
            try:
                doc = json.loads(self._request(base + "/digest?sketch=1"))
                merged.merge_json(doc)
            except urllib.error.HTTPError as exc:
                raise MongoProxyError(
                    f"{base}/digest answered {exc.code}: is the digest on (no --no-digest)?"
                ) from None
            except (OSError, ValueError, KeyError) as exc:
                raise MongoProxyError(f"cannot read the digest of {base}: {exc}") from None
        return merged

    def reset(self) -> None:
        """POST /digest/reset on every proxy."""
        for base in self.urls:
            self._request(base + "/digest/reset", "POST")


def main(args: argparse.Namespace) -> int:
    """Run `mongoproxy top`."""
    token = None
    if args.admin_token_file:
        try:
            with open(args.admin_token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise MongoProxyError(f"cannot read --admin-token-file {args.admin_token_file}: {exc.strerror}") from None
    if args.interval <= 0 or args.limit <= 0:
        raise MongoProxyError("--interval and --limit must be positive")
    sources = Sources(args.admin or [DEFAULT_ADMIN], token)
    if args.once:
        doc = sources.merged().to_json(args.sort, args.limit, args.ns, args.app)
        sys.stdout.write(json.dumps(doc, indent=2) + "\n" if args.json else digestview.plain_table(doc))
        return 0
    if args.json:
        raise MongoProxyError("--json goes with --once")
    if not (sys.stdout.isatty() and sys.stdin.isatty()):
        shown = 0
        while True:  # until interrupted or --count tables, as `top -b -n N` does
            doc = sources.merged().to_json(args.sort, args.limit, args.ns, args.app)
            sys.stdout.write(digestview.plain_table(doc) + "\n")
            sys.stdout.flush()
            shown += 1
            if shown == args.count:
                return 0
            time.sleep(args.interval)
    return _interactive(sources, args)


@contextlib.contextmanager
def _cbreak() -> Iterator[int]:
    import termios
    import tty

    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


class _View:
    """State of the interactive view, changed by keys."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.sort = args.sort
        self.limit = args.limit
        self.ns: list[str] = list(args.ns)
        self.app: str | None = args.app
        self.selected = 0
        self.show_example = False
        self.prompt: str | None = None  # "ns" or "app" while a filter is typed
        self.typed = ""
        self.status = ""

    def key(self, k: str, sources: Sources) -> bool:
        """Apply one key; False to quit."""
        if self.prompt is not None:
            if k in ("\r", "\n"):
                value = self.typed.strip()
                if self.prompt == "ns":
                    self.ns = [v for v in value.split(",") if v]
                else:
                    self.app = value or None
                self.prompt = None
            elif k == "\x1b":
                self.prompt = None
            elif k in ("\x7f", "\b"):
                self.typed = self.typed[:-1]
            elif k.isprintable():
                self.typed += k
            return True
        if k in ("q", "\x03"):
            return False
        if k in digestview.SORT_KEYS:
            self.sort = digestview.SORT_KEYS[k]
        elif k in ("\x1b[A", "k"):
            self.selected = max(0, self.selected - 1)
        elif k in ("\x1b[B", "j"):
            self.selected += 1
        elif k in ("\r", "\n", "x"):
            self.show_example = not self.show_example
        elif k in ("n", "/"):
            self.prompt, self.typed = "ns", ",".join(self.ns)
        elif k == "a":
            self.prompt, self.typed = "app", self.app or ""
        elif k == "r":
            try:
                sources.reset()
                self.status = "reset " + ", ".join(sources.urls)
            except OSError as exc:
                self.status = f"reset failed: {exc}"
        return True

    def render(self, doc: dict | None) -> Any:
        from rich.console import Group
        from rich.panel import Panel
        from rich.text import Text

        parts: list[Any] = []
        filters = f"ns={','.join(self.ns) or '*'} app={self.app or '*'}"
        if doc is None:
            parts.append(Text(self.status or "fetching…", style="red"))
        else:
            self.selected = min(self.selected, max(0, len(doc["shapes"]) - 1))
            parts.append(
                Text(
                    f"mongoproxy top · {len(doc['shapes'])}/{doc['shape_count']} shapes since {doc['since']} · "
                    f"{filters} · {self.status}",
                    style="bold",
                )
            )
            parts.append(digestview.rich_table(doc, self.selected, self.sort))
            if self.show_example and doc["shapes"]:
                s = doc["shapes"][self.selected]
                errors = ", ".join(f"{k}={v}" for k, v in s["errors"].items()) or "none"
                parts.append(
                    Panel(
                        Text(f"{s['example'] or '(no query text)'}\nerrors: {errors}; first seen {s['first_seen']}"),
                        title=f"{digestview.ns_of(s)} {s['op']} {s['shape']}",
                    )
                )
        if self.prompt is not None:
            parts.append(Text(f"{self.prompt} filter (enter to apply, esc to cancel): {self.typed}▏", style="yellow"))
        else:
            parts.append(Text(HELP, style="dim"))
        return Group(*parts)


def _interactive(sources: Sources, args: argparse.Namespace) -> int:
    from rich.live import Live

    view = _View(args)
    merged: Digest | None = None
    next_fetch = 0.0
    with _cbreak() as fd, Live(view.render(None), screen=True, auto_refresh=False) as live:
        while True:
            now = time.monotonic()
            if now >= next_fetch:
                try:
                    merged = sources.merged()
                    view.status = view.status if view.status.startswith("reset") else ""
                except MongoProxyError as exc:
                    view.status = str(exc)
                next_fetch = now + args.interval
            doc = merged.to_json(view.sort, view.limit, view.ns, view.app) if merged is not None else None
            live.update(view.render(doc), refresh=True)
            ready, _, _ = select.select([fd], [], [], max(0.0, min(0.2, next_fetch - time.monotonic())))
            if ready:
                data = os.read(fd, 32).decode("utf-8", "replace")
                keys = [data] if data.startswith("\x1b[") else list(data)
                for k in keys:
                    if not view.key(k, sources):
                        return 0
                if any(k == "r" for k in keys):
                    next_fetch = 0.0
