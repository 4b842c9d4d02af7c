"""`mongoproxy init-iptables`: the nat rules that send a pod's MongoDB connections through the proxy.

All rules live in one chain, MONGOPROXY_OUTPUT in the nat table, jumped to
from OUTPUT. Installing flushes and refills that chain and adds the jump only
when it is missing, so running it twice leaves one set of rules; uninstalling
deletes the jump and the chain. The proxy's own uid is excluded, so its
upstream connections are never redirected back to itself.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mongoproxy.errors import ConfigError, StartupError

CHAIN = "MONGOPROXY_OUTPUT"
TABLE = "nat"
LOCK_WAIT_SECONDS = "10"
MULTIPORT_MAX = 15  # the multiport match takes at most 15 ports (a range counts as two)
CAP_NET_ADMIN = 12  # linux/capability.h
NO_NET_ADMIN = (
    "init-iptables needs the NET_ADMIN capability: run it as root with NET_ADMIN and NET_RAW "
    "(in Kubernetes: securityContext.capabilities.add [NET_ADMIN, NET_RAW], runAsUser 0), "
    "or use --dry-run to print the rules"
)
BACKENDS = {
    "auto": ("iptables", "ip6tables"),
    "nft": ("iptables-nft", "ip6tables-nft"),
    "legacy": ("iptables-legacy", "ip6tables-legacy"),
}


def parse_port_list(value: str, flag: str = "--mongo-ports") -> tuple[str, ...]:
    """'27017,27018,28000-28010' -> ('27017', '27018', '28000:28010'); ranges use iptables' a:b form."""
    items: list[str] = []
    for part in (p.strip() for p in str(value).split(",")):
        if not part:
            continue
        lo, sep, hi = part.replace(":", "-").partition("-")
        try:
            ports = [int(lo)] + ([int(hi)] if sep else [])
        except ValueError:
            raise ConfigError(
                f"{flag} {value!r}: {part!r} is not a port or a range: use e.g. 27017,27018 or 27017-27019"
            ) from None
        for p in ports:
            if not 1 <= p <= 65535:
                raise ConfigError(f"{flag} {value!r}: port {p} is out of range: use 1 to 65535")
        if sep and ports[0] >= ports[1]:
            raise ConfigError(f"{flag} {value!r}: range {part!r} must go from low to high, e.g. 27017-27019")
        item = f"{ports[0]}:{ports[1]}" if sep else str(ports[0])
        if item not in items:
            items.append(item)
    if not items:
        raise ConfigError(f"{flag} is empty: give at least one port, e.g. 27017")
    return tuple(items)


def port_in(port: int, items: Sequence[str]) -> bool:
    """True when `port` is one of the ports or inside one of the ranges of parse_port_list()."""
    for item in items:
        lo, _, hi = item.partition(":")
        if int(lo) <= port <= int(hi or lo):
            return True
    return False


def _port_arg(what: str) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            port = int(value)
        except ValueError:
            raise ConfigError(f"{what} {value!r} is not a port number: use an integer from 1 to 65535") from None
        if not 1 <= port <= 65535:
            raise ConfigError(f"{what} {port} is out of range: use an integer from 1 to 65535")
        return port

    return parse


def parse_uid(value: str) -> int:
    """A numeric uid other than 0 (excluding root's traffic would exclude far too much)."""
    try:
        uid = int(value)
    except ValueError:
        raise ConfigError(f"--proxy-uid {value!r} is not a number: give the proxy's numeric uid, e.g. 9999") from None
    if uid <= 0 or uid >= 2**32 - 1:
        raise ConfigError(
            f"--proxy-uid {uid}: run the proxy under a dedicated non-root uid (e.g. 9999) and give it "
            "here; uid 0 would exempt every root process from the redirect"
        )
    return uid


@dataclass(frozen=True)
class Rules:
    """What to redirect: TCP to `mongo_ports` goes to `proxy_port`, except the proxy's own uid."""

    proxy_port: int = 27111
    mongo_ports: tuple[str, ...] = ("27017",)
    proxy_uid: int = 9999
    ipv6: bool = False

    def check(self) -> None:
        """Cross-field checks; ConfigError names the fix."""
        if port_in(self.proxy_port, self.mongo_ports):
            raise ConfigError(
                f"--proxy-port {self.proxy_port} is also in --mongo-ports: the proxy would redirect "
                "to itself; choose a proxy port outside the MongoDB ports"
            )


@dataclass(frozen=True)
class Step:
    """One iptables invocation. `unless`: skip when this check command succeeds.

    `tolerate`: a failure is fine when the state it aimed at already holds (chain exists/missing).
    `repeat`: run while `unless`-style check succeeds (deleting every duplicate jump).
    """

    argv: tuple[str, ...]
    unless: tuple[str, ...] | None = None
    tolerate: bool = False
    repeat_while: tuple[str, ...] | None = None

    def shell(self) -> str:
        """This step as one POSIX shell line with the same effect."""
        cmd = shlex.join(self.argv)
        if self.repeat_while:
            return f"while {shlex.join(self.repeat_while)} 2>/dev/null; do {cmd}; done"
        if self.unless:
            return f"{shlex.join(self.unless)} 2>/dev/null || {cmd}"
        if self.tolerate:
            return f"{cmd} 2>/dev/null || true"
        return cmd


def _dport_matches(ports: tuple[str, ...]) -> list[list[str]]:
    """iptables match arguments covering `ports`, split to respect multiport's 15-port limit."""
    if len(ports) == 1 and ":" not in ports[0]:
        return [["--dport", ports[0]]]
    groups: list[list[str]] = [[]]
    weight = 0
    for item in ports:
        w = 2 if ":" in item else 1
        if weight + w > MULTIPORT_MAX:
            groups.append([])
            weight = 0
        groups[-1].append(item)
        weight += w
    return [["-m", "multiport", "--dports", ",".join(g)] for g in groups]


def chain_rules(rules: Rules) -> list[list[str]]:
    """The rule specifications of the chain, in order (without `-A CHAIN`)."""
    out = [
        # The proxy's own upstream connections go where they were aimed.
        ["-m", "owner", "--uid-owner", str(rules.proxy_uid), "-j", "RETURN"],
        # Loopback traffic to the proxy port itself is never rewritten.
        ["-o", "lo", "-p", "tcp", "--dport", str(rules.proxy_port), "-j", "RETURN"],
    ]
    for match in _dport_matches(rules.mongo_ports):
        out.append(["-p", "tcp", *match, "-j", "REDIRECT", "--to-ports", str(rules.proxy_port)])
    return out


JUMP = ("-p", "tcp", "-j", CHAIN)


def install_steps(binary: str, rules: Rules) -> list[Step]:
    """Idempotent install: create (or keep) the chain, refill it, add the jump once."""
    base = (binary, "-w", LOCK_WAIT_SECONDS, "-t", TABLE)
    steps = [
        Step(base + ("-N", CHAIN), tolerate=True),
        Step(base + ("-F", CHAIN)),
    ]
    steps += [Step(base + ("-A", CHAIN, *spec)) for spec in chain_rules(rules)]
    steps.append(Step(base + ("-I", "OUTPUT", "1", *JUMP), unless=base + ("-C", "OUTPUT", *JUMP)))
    return steps


def uninstall_steps(binary: str) -> list[Step]:
    """Idempotent uninstall: delete every jump, then flush and delete the chain."""
    base = (binary, "-w", LOCK_WAIT_SECONDS, "-t", TABLE)
    return [
        Step(base + ("-D", "OUTPUT", *JUMP), repeat_while=base + ("-C", "OUTPUT", *JUMP)),
        Step(base + ("-F", CHAIN), tolerate=True),
        Step(base + ("-X", CHAIN), tolerate=True),
    ]


def plan(rules: Rules, uninstall: bool = False, backend: str = "auto") -> list[Step]:
    """Every step for IPv4, then IPv6 when asked."""
    v4, v6 = BACKENDS[backend]
    steps: list[Step] = []
    for binary in (v4, v6) if rules.ipv6 else (v4,):
        steps += uninstall_steps(binary) if uninstall else install_steps(binary, rules)
    return steps


# ---- running the steps ----


def has_net_admin(status_path: str = "/proc/self/status") -> bool | None:
    """Whether this process holds CAP_NET_ADMIN (None when it cannot be told)."""
    try:
        with open(status_path, encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


class Runner:
    """Runs steps with subprocess; every failure becomes one line naming the fix."""

    def __init__(self, run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> None:
        self._run = run

    def call(self, argv: Sequence[str]) -> subprocess.CompletedProcess:
        try:
            return self._run(list(argv), capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            raise StartupError(
                f"{argv[0]} not found: install the iptables package "
                "(the mongoproxy image carries it), or choose another --backend"
            ) from None
        except subprocess.TimeoutExpired:
            raise StartupError(
                f"{shlex.join(argv)} did not finish within 60 s: another process holds the xtables lock; retry"
            ) from None

    def execute(self, steps: Sequence[Step]) -> None:
        for step in steps:
            if step.repeat_while:
                for _ in range(1000):  # every duplicate jump, bounded
                    if self.call(step.repeat_while).returncode != 0:
                        break
                    self._check(step, self.call(step.argv))
                continue
            if step.unless and self.call(step.unless).returncode == 0:
                continue
            result = self.call(step.argv)
            if result.returncode != 0 and not step.tolerate:
                self._check(step, result)
            elif result.returncode != 0 and _permission_problem(result.stderr):
                raise StartupError(NO_NET_ADMIN)

    @staticmethod
    def _check(step: Step, result: subprocess.CompletedProcess) -> None:
        if result.returncode == 0:
            return
        if _permission_problem(result.stderr):
            raise StartupError(NO_NET_ADMIN)
        message = " ".join((result.stderr or result.stdout or f"exit status {result.returncode}").split())
        raise StartupError(
            f"{shlex.join(step.argv)} failed: {message} (does the kernel have the nat table "
            "and the owner/multiport matches? try --backend nft or --backend legacy)"
        )

    def listing(self, binary: str) -> list[str]:
        """The installed rules: the OUTPUT jump(s) and the chain, as `iptables -S` lines."""
        lines = []
        for args in (("-S", "OUTPUT"), ("-S", CHAIN)):
            result = self.call((binary, "-w", LOCK_WAIT_SECONDS, "-t", TABLE, *args))
            for line in result.stdout.splitlines():
                if CHAIN in line:
                    lines.append(line)
        return lines


def _permission_problem(stderr: str) -> bool:
    text = (stderr or "").lower()
    return "permission denied" in text or "you must be root" in text or "operation not permitted" in text


# ---- the sub-command ----


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `mongoproxy init-iptables`."""
    p = subparsers.add_parser(
        "init-iptables",
        help="install the nat rules that redirect MongoDB connections into the proxy",
        description="Install (or with --uninstall remove) the iptables nat rules that redirect this network "
        f"namespace's outbound TCP connections to the MongoDB ports into the proxy, in their own chain {CHAIN} "
        "jumped to from OUTPUT. The proxy's uid is excluded so its upstream connections are not looped back. "
        "Idempotent: running it twice leaves one set of rules. Needs NET_ADMIN (run it as the pod's init "
        "container); the proxy must run transparent mode: mongoproxy run --proxy PROXY_PORT.",
    )
    p.add_argument(
        "--proxy-port",
        type=_port_arg("--proxy-port"),
        default=27111,
        metavar="PORT",
        help="port the transparent proxy listens on (default: 27111)",
    )
    p.add_argument(
        "--mongo-ports",
        type=parse_port_list,
        default=("27017",),
        metavar="PORTS",
        help="comma-separated MongoDB ports or ranges to redirect, e.g. 27017,27018 or 27017-27019 (default: 27017)",
    )
    p.add_argument(
        "--proxy-uid",
        type=parse_uid,
        default=9999,
        metavar="UID",
        help="uid the proxy runs as; its connections are not redirected (default: 9999)",
    )
    p.add_argument(
        "--ipv6",
        action="store_true",
        help="also install the rules with ip6tables (dual-stack and "
        "IPv6 pods; the proxy must then listen on ::1 too, e.g. --listen-host ::)",
    )
    p.add_argument("--uninstall", action="store_true", help="remove the rules and the chain instead")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the exact commands as a shell script with the same effect, and change nothing",
    )
    p.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        default="auto",
        help="which iptables to run: auto (whatever 'iptables' is), nft or legacy (default: auto)",
    )
    p.set_defaults(func=handler)
    return p


def handler(args: argparse.Namespace, runner: Runner | None = None, out=None) -> int:
    """Run the sub-command; returns the exit code."""
    out = out or sys.stdout
    rules = Rules(
        proxy_port=args.proxy_port, mongo_ports=tuple(args.mongo_ports), proxy_uid=args.proxy_uid, ipv6=args.ipv6
    )
    if not args.uninstall:
        rules.check()
    steps = plan(rules, uninstall=args.uninstall, backend=args.backend)
    if args.dry_run:
        out.write(
            "# mongoproxy init-iptables --dry-run: "
            + ("remove" if args.uninstall else "install")
            + f" the {CHAIN} nat chain\n"
        )
        for step in steps:
            out.write(step.shell() + "\n")
        return 0
    runner = runner or Runner()
    if has_net_admin() is False:
        raise StartupError(NO_NET_ADMIN)
    runner.execute(steps)
    binaries = BACKENDS[args.backend][: 2 if rules.ipv6 else 1]
    if args.uninstall:
        out.write(
            f"mongoproxy init-iptables: removed the {CHAIN} chain and its jump from OUTPUT "
            f"({', '.join(binaries)}, table {TABLE})\n"
        )
        return 0
    out.write(
        f"mongoproxy init-iptables: TCP to port(s) {','.join(rules.mongo_ports)} now goes to "
        f"127.0.0.1:{rules.proxy_port}{' and [::1]:' + str(rules.proxy_port) if rules.ipv6 else ''}, "
        f"except for uid {rules.proxy_uid}; rules in table {TABLE}:\n"
    )
    for binary in binaries:
        for line in runner.listing(binary):
            out.write(f"  {os.path.basename(binary)} -t {TABLE} {line}\n")
    out.flush()
    return 0
