"""Command line: `mongoproxy run|demo|...`; `mongoproxy --proxy SPEC` is the same as `run`.

Sub-commands other than run/demo live in their own modules, each offering
`add_parser(subparsers)` that registers a parser whose `func(args) -> int`
runs it. User mistakes print one line naming the fix and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from mongoproxy import __version__
from mongoproxy.errors import MongoProxyError

# Modules offering add_parser(subparsers) for further sub-commands.
COMMAND_MODULES: tuple[str, ...] = (
    "mongoproxy.iptables",
    "mongoproxy.inject",
    "mongoproxy.replay",
    "mongoproxy.top",
    "mongoproxy.recdigest",
    "mongoproxy.webhook",
    "mongoproxy.faults.cli",
)

PROG = "mongoproxy"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that name where to look."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _add_config_options(parser: argparse.ArgumentParser, options: list) -> None:
    groups: dict[str, Any] = {}
    for o in options:
        group = groups.get(o.group)
        if group is None:
            group = groups[o.group] = parser.add_argument_group(f"{o.group} options")
        default_text = "" if o.default in (None, (), "", False) else f" (default: {_show(o.default)})"
        help_text = f"{o.help}{default_text} [env {o.env}]"
        if o.switch:
            group.add_argument(*o.flags, dest=o.dest, action="store_const", const=True, default=None, help=help_text)
        elif o.multiple:
            group.add_argument(*o.flags, dest=o.dest, action="append", default=None, metavar=o.metavar, help=help_text)
        else:
            group.add_argument(*o.flags, dest=o.dest, default=None, metavar=o.metavar, help=help_text)


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    """The full parser: run, demo and the registered sub-commands."""
    from mongoproxy import config as config_mod

    options = config_mod.all_options()
    parser = _Parser(
        prog=PROG,
        description="A streaming MongoDB wire-protocol proxy: forwards every byte "
        "unchanged and reports per-command latency, errors and traffic.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser(
        "run",
        help="run the proxy",
        description="Run the proxy. Every flag can also be set "
        "with a MONGOPROXY_<NAME> environment variable or in a TOML file given by --config.",
    )
    run.add_argument(
        "--config",
        metavar="PATH",
        default=os.environ.get("MONGOPROXY_CONFIG"),
        help="TOML file of settings, keys named like the long flags with underscores [env MONGOPROXY_CONFIG]",
    )
    _add_config_options(run, options)
    run.set_defaults(func=_run)

    demo = sub.add_parser(
        "demo",
        help="start an embedded server, the proxy and a sample workload",
        description="Start an embedded SecantusDB, the proxy in front of it and a short sample "
        "workload, print what the proxy observed, then keep running until Ctrl-C.",
    )
    demo.add_argument("--port", type=int, default=0, help="proxy listen port (default: a free port)")
    demo.add_argument("--admin-port", type=int, default=9898, help="admin endpoint port (default: 9898)")
    demo.add_argument(
        "--exit-after-workload",
        action="store_true",
        help="stop once the workload has run instead of waiting for Ctrl-C",
    )
    demo.set_defaults(func=_demo)

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
    from mongoproxy import config as config_mod
    from mongoproxy import server

    flags = {o.dest: getattr(args, o.dest, None) for o in config_mod.all_options()}
    file_values = config_mod.load_file(args.config) if args.config else {}
    cfg = config_mod.build(flags, file_values=file_values)
    config_mod.check_proxies(cfg)
    return server.run(cfg)


def _demo(args: argparse.Namespace) -> int:
    from mongoproxy import demo

    return demo.main(port=args.port, admin_port=args.admin_port, exit_after_workload=args.exit_after_workload)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mongoproxy` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # `mongoproxy --proxy ...` (the Rust mongoproxy's form) means `mongoproxy run --proxy ...`.
    if argv and argv[0].startswith("--") and argv[0] not in ("--help", "--version"):
        argv.insert(0, "run")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except MongoProxyError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
