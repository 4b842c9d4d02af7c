"""The `mongoproxy inject` sub-command: its flags, reading files or stdin, writing the injected YAML and the notes."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from mongoproxy.errors import ConfigError
from mongoproxy.inject.documents import inject_text
from mongoproxy.inject.names import ANN_INJECT, DEFAULT_IMAGE
from mongoproxy.inject.pod import Report
from mongoproxy.inject.settings import ANNOTATION_OVERRIDES, options_from_args


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `mongoproxy inject`."""
    p = subparsers.add_parser(
        "inject",
        help="add the mongoproxy sidecar to Kubernetes YAML",
        description="Read Kubernetes YAML (files, or - for stdin; multi-document and List) and write it to stdout "
        "with the mongoproxy sidecar added to every pod template (Deployment, StatefulSet, DaemonSet, "
        "ReplicaSet, Job, CronJob, Pod): an init container running 'mongoproxy init-iptables' and the "
        "proxy as a native sidecar (Kubernetes >= 1.29). Injecting twice gives the same output. Pods "
        f'annotated {ANN_INJECT}: "false" are left alone; the annotations '
        f"{', '.join(ANNOTATION_OVERRIDES)} override the flags per workload. Example: kubectl get deploy web -o yaml | mongoproxy inject - | kubectl apply -f -",
    )
    p.add_argument("files", nargs="*", metavar="FILE", help="YAML files to read; - (or none) reads stdin")
    p.add_argument(
        "-f",
        "--filename",
        dest="more_files",
        action="append",
        default=[],
        metavar="FILE",
        help="a YAML file to read (repeatable; - is stdin), like kubectl's -f",
    )
    p.add_argument("--image", default=DEFAULT_IMAGE, help=f"the mongoproxy image (default: {DEFAULT_IMAGE})")
    p.add_argument(
        "--image-pull-policy",
        default="IfNotPresent",
        choices=("Always", "IfNotPresent", "Never"),
        help="imagePullPolicy of both containers (default: IfNotPresent)",
    )
    p.add_argument(
        "--mongo-ports",
        default="27017",
        metavar="PORTS",
        help="comma-separated MongoDB ports or ranges to redirect (default: 27017)",
    )
    p.add_argument("--proxy-port", default="27111", metavar="PORT", help="transparent proxy port (default: 27111)")
    p.add_argument(
        "--admin-port",
        default="9898",
        metavar="PORT",
        help="admin endpoint port for probes and /metrics (default: 9898)",
    )
    p.add_argument("--proxy-uid", default="9999", metavar="UID", help="uid the proxy runs as (default: 9999)")
    p.add_argument(
        "--legacy-sidecar",
        action="store_true",
        help="add the proxy as an ordinary container, for Kubernetes < 1.29 (a Job then never completes)",
    )
    p.add_argument(
        "--ipv6",
        action="store_true",
        help="also redirect IPv6 (ip6tables); the proxy then listens on 127.0.0.1 and ::1",
    )
    p.add_argument(
        "--iptables-backend",
        choices=("auto", "nft", "legacy"),
        default="auto",
        help="iptables flavour the init container uses: auto (the image's default, nft), nft or legacy (default: auto)",
    )
    p.add_argument(
        "--proxy-args",
        action="append",
        default=[],
        metavar="ARGS",
        help="extra 'mongoproxy run' arguments as one shell-quoted string, e.g. "
        "--proxy-args='--log-commands --slow-ms 100' (repeatable)",
    )
    for name, default, what in (
        ("cpu-request", "50m", "CPU request of the proxy container"),
        ("memory-request", "64Mi", "memory request of the proxy container"),
        ("cpu-limit", "1", "CPU limit of the proxy container"),
        ("memory-limit", "256Mi", "memory limit of the proxy container"),
    ):
        p.add_argument(f"--{name}", default=default, metavar="QUANTITY", help=f"{what} (default: {default})")
    p.add_argument(
        "--metric-labels",
        default=None,
        metavar="LABELS",
        help="the proxy's --metric-labels, e.g. op,db,collection (default: the proxy's own default)",
    )
    p.add_argument("--log-commands", action="store_true", help="the proxy logs one line per command")
    p.add_argument(
        "--tls-secret",
        metavar="NAME",
        help="a kubernetes.io/tls Secret (tls.crt, tls.key, optionally ca.crt) mounted into the sidecar: the "
        "listener opens the apps' TLS with it (--tls-listen allow); apps must trust its CA (see docs/tls.md)",
    )
    p.add_argument(
        "--tls-upstream-ca",
        action="store_true",
        help="with --tls-secret: speak TLS to the servers and verify them with the Secret's ca.crt",
    )
    p.set_defaults(func=handler)
    return p


def _read(path: str, stdin: TextIO) -> str:
    if path == "-":
        if stdin.isatty():
            raise ConfigError(
                "no input: give a YAML file, or pipe YAML in, e.g. kubectl get deploy -o yaml | mongoproxy inject -"
            )
        return stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: check the file name") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory: give the YAML files in it, e.g. {path.rstrip('/')}/*.yaml") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text: give a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def handler(
    args: argparse.Namespace,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the sub-command; returns the exit code."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    opts = options_from_args(args)
    paths = list(args.files) + list(args.more_files) or ["-"]
    report = Report()
    outputs = []
    for path in paths:
        source = "<stdin>" if path == "-" else path
        outputs.append(inject_text(_read(path, stdin), opts, source, report))
    # Everything is rendered before anything is written: a bad document leaves stdout empty.
    for i, text in enumerate(outputs):
        if i and text and not text.startswith("---"):
            stdout.write("---\n")
        stdout.write(text)
    stdout.flush()
    for note in report.notes:
        stderr.write(f"mongoproxy inject: note: {note}\n")
    return 0
