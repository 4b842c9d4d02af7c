"""`mongoproxy fault add|list|rm|reset`: manage drill rules through a running proxy's admin API.

The flags carry the rule keys' names (`--op`, `--ns`, `--action`, `--code`,
`--label`, `--max-count`, `--ms`, ...), with `--error CODE` short for
`--action error --code CODE`. In Kubernetes, reach a sidecar with
`kubectl port-forward pod/NAME 9898` and keep the default --admin URL.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from mongoproxy.errors import ConfigError, MongoProxyError

DEFAULT_ADMIN = "http://127.0.0.1:9898"
TIMEOUT = 10.0


def add_parser(sub: Any) -> None:
    """Register `fault` and its sub-commands."""
    fault = sub.add_parser(
        "fault",
        help="add, list or remove fault injection rules of a running proxy (drills)",
        description="Manage fault injection rules through a running proxy's admin endpoint "
        "(the proxy needs --allow-faults). See docs/drills.md.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--admin",
        metavar="URL",
        default=os.environ.get("MONGOPROXY_ADMIN_URL", DEFAULT_ADMIN),
        help=f"the proxy's admin endpoint (default: {DEFAULT_ADMIN}) [env MONGOPROXY_ADMIN_URL]",
    )
    common.add_argument(
        "--admin-token-file",
        metavar="PATH",
        default=os.environ.get("MONGOPROXY_ADMIN_TOKEN_FILE"),
        help="file holding the bearer token of the admin endpoint [env MONGOPROXY_ADMIN_TOKEN_FILE]",
    )
    actions = fault.add_subparsers(dest="fault_command", metavar="ACTION")
    add = actions.add_parser("add", parents=[common], help="add a rule", description="Add a fault rule.")
    add.add_argument("name", help="rule name (letters, digits, '.', '_', '-')")
    m = add.add_argument_group("match (all given must match)")
    m.add_argument("--op", action="append", help="command name; repeatable or comma-separated; !name excludes")
    m.add_argument("--ns", action="append", help="namespace: db.collection or a glob such as db.*; repeatable")
    m.add_argument("--app", help="appName glob")
    m.add_argument("--client", help="client address range (CIDR), e.g. 10.1.0.0/16")
    m.add_argument("--shape", help="query-shape hash, as the command log shows it with --log-query")
    m.add_argument("--comment", help="substring of the command's comment")
    lim = add.add_argument_group("limits")
    lim.add_argument("--percentage", type=float, help="share of matching commands to act on, 0-100 (default 100)")
    lim.add_argument("--max-count", type=int, help="stop after this many injections")
    lim.add_argument("--duration", help="active for this long from now, e.g. 10m")
    lim.add_argument("--until", help="active until this time, ISO 8601")
    act = add.add_argument_group("action")
    act.add_argument(
        "--action", choices=("delay", "error", "write_error", "close", "blackhole", "throttle"), help="what to do"
    )
    act.add_argument("--error", type=int, metavar="CODE", help="short for --action error --code CODE")
    act.add_argument("--code", type=int, help="server error code (error, write_error)")
    act.add_argument("--errmsg", help="error message (error, write_error)")
    act.add_argument("--label", action="append", help="error label, e.g. RetryableWriteError; repeatable")
    act.add_argument("--ms", type=float, help="delay in milliseconds")
    act.add_argument("--jitter-ms", type=float, help="random extra delay, up to this many milliseconds")
    act.add_argument("--where", choices=("request", "reply"), help="delay the request (default) or the reply")
    act.add_argument("--after-ms", type=float, help="close: wait this long before closing")
    act.add_argument("--bytes-per-second", type=int, help="throttle: reply bandwidth")
    add.set_defaults(func=_add)
    ls = actions.add_parser("list", parents=[common], help="list the rules", description="List the fault rules.")
    ls.add_argument("--json", action="store_true", help="print the admin API's JSON")
    ls.set_defaults(func=_list)
    rm = actions.add_parser("rm", parents=[common], help="remove a rule", description="Remove a fault rule.")
    rm.add_argument("name")
    rm.set_defaults(func=_rm)
    reset = actions.add_parser(
        "reset", parents=[common], help="remove every rule (stops a drill)", description="Remove every fault rule."
    )
    reset.set_defaults(func=_reset)
    fault.set_defaults(func=lambda args: (fault.print_help(), 2)[1])


def rule_from_args(args: argparse.Namespace) -> dict:
    """The flat rule the flags describe."""
    rule: dict = {"name": args.name}
    if args.error is not None:
        if args.action not in (None, "error"):
            raise ConfigError(f"--error {args.error} means --action error; it cannot go with --action {args.action}")
        if args.code is not None and args.code != args.error:
            raise ConfigError("give the code once: --error CODE or --action error --code CODE")
        rule["action"], rule["code"] = "error", args.error
    elif args.action:
        rule["action"] = args.action
    else:
        raise ConfigError("no action: give --action delay|error|write_error|close|blackhole|throttle or --error CODE")
    for key in ("op", "ns"):
        values = getattr(args, key)
        if values:
            items = [p.strip() for v in values for p in v.split(",") if p.strip()]
            rule[key] = items[0] if len(items) == 1 else items
    for key in (
        "app",
        "client",
        "shape",
        "comment",
        "percentage",
        "max_count",
        "duration",
        "until",
        "code",
        "errmsg",
        "ms",
        "jitter_ms",
        "where",
        "after_ms",
        "bytes_per_second",
    ):
        value = getattr(args, key)
        if value is not None and key not in rule:
            rule[key] = int(value) if isinstance(value, float) and value.is_integer() else value
    if args.label:
        rule["labels"] = [p.strip() for v in args.label for p in v.split(",") if p.strip()]
    return rule


def request(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """Call the admin API; the parsed JSON answer, or MongoProxyError with the server's one-line reason."""
    base = args.admin.rstrip("/")
    if "://" not in base:
        base = "http://" + base
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if args.admin_token_file:
        try:
            with open(args.admin_token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"--admin-token-file {args.admin_token_file}: cannot read it ({exc.strerror})") from None
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        reason = exc.read().decode("utf-8", "replace").strip().splitlines()
        raise MongoProxyError(f"{method} {path}: {exc.code} {reason[0] if reason else exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", exc)
        raise MongoProxyError(
            f"cannot reach the admin endpoint at {base} ({why}): is the proxy running with its admin port "
            "there (in Kubernetes: kubectl port-forward pod/POD 9898)? Set it with --admin URL"
        ) from None


def _add(args: argparse.Namespace) -> int:
    rule = request(args, "POST", "/faults", rule_from_args(args))
    print(f"added {rule['name']}: {describe(rule)}")
    return 0


def describe(rule: dict) -> str:
    """A rule on one line: its match and its action."""
    match = " ".join(
        f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in rule.items()
        if k in ("op", "ns", "app", "client", "shape", "comment")
    )
    params = " ".join(
        f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in rule.items()
        if k
        in (
            "ms",
            "jitter_ms",
            "where",
            "code",
            "errmsg",
            "labels",
            "after_ms",
            "bytes_per_second",
            "percentage",
            "max_count",
            "duration",
            "until",
        )
    )
    return f"{rule.get('action')} {params} when {match or 'any command'}".replace("  ", " ")


def _list(args: argparse.Namespace) -> int:
    data = request(args, "GET", "/faults")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [("NAME", "ACTION", "MATCH", "PARAMETERS", "INJECTED", "STATE")]
    for r in data.get("rules", []):
        match = " ".join(
            f"{k}={','.join(v) if isinstance(v, list) else v}"
            for k, v in r.items()
            if k in ("op", "ns", "app", "client", "shape", "comment")
        )
        params = " ".join(
            f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in r.items()
            if k not in ("name", "action", "injected", "active", "op", "ns", "app", "client", "shape", "comment")
        )
        injected = str(r.get("injected", 0)) + (f"/{r['max_count']}" if r.get("max_count") else "")
        rows.append(
            (r["name"], r["action"], match or "*", params or "-", injected, "active" if r.get("active") else "done")
        )
    if len(rows) == 1:
        print("no fault rules")
    else:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if data.get("file_error"):
        print(f"rules file: {data['file_error']}", file=sys.stderr)
    return 0


def _rm(args: argparse.Namespace) -> int:
    request(args, "DELETE", f"/faults/{urllib.parse.quote(args.name, safe='')}")
    print(f"removed {args.name}")
    return 0


def _reset(args: argparse.Namespace) -> int:
    data = request(args, "POST", "/faults/reset")
    print(f"removed {data.get('removed', 0)} rule(s)")
    return 0
