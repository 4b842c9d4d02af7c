"""`mongoproxy inject`: add the mongoproxy sidecar to every pod template in Kubernetes YAML.

In the spirit of `linkerd inject`: reads manifests (multi-document, `List`),
adds an init container running `mongoproxy init-iptables` and the proxy as a
native sidecar (an init container with restartPolicy Always) or, with
--legacy-sidecar, an ordinary container, and writes everything back with field
order and comments kept (ruamel.yaml round-trip). Invariants:
  - injecting an injected manifest gives the same output (what was added is
    recorded in the annotation mongoproxy.io/injected and replaced in place);
  - resources without a pod template pass through unchanged, with a note;
  - a workload annotated mongoproxy.io/inject: "false" passes through unchanged.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shlex
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TextIO, TypeGuard

from mongoproxy import __version__
from mongoproxy.errors import ConfigError
from mongoproxy.iptables import parse_port_list, parse_uid, port_in
from mongoproxy.shutdown import SHUTDOWN_MARGIN_SECONDS, grace_seconds

ANNOTATION_PREFIX = "mongoproxy.io/"
ANN_INJECT = "mongoproxy.io/inject"
ANN_STATUS = "mongoproxy.io/injected"
ANN_MONGO_PORTS = "mongoproxy.io/mongo-ports"
ANN_PROXY_PORT = "mongoproxy.io/proxy-port"
ANN_ADMIN_PORT = "mongoproxy.io/admin-port"
ANN_DRAIN_SECONDS = "mongoproxy.io/drain-seconds"
ANN_PROXY_ARGS = "mongoproxy.io/proxy-args"
ANN_IMAGE = "mongoproxy.io/image"
ANN_CPU_REQUEST = "mongoproxy.io/cpu-request"
ANN_MEMORY_REQUEST = "mongoproxy.io/memory-request"
ANN_CPU_LIMIT = "mongoproxy.io/cpu-limit"
ANN_MEMORY_LIMIT = "mongoproxy.io/memory-limit"
ANN_METRIC_LABELS = "mongoproxy.io/metric-labels"
ANN_LOG_COMMANDS = "mongoproxy.io/log-commands"
ANN_TLS_SECRET = "mongoproxy.io/tls-secret"
ANN_TLS_UPSTREAM_CA = "mongoproxy.io/tls-upstream-ca"
ANN_DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"
LABEL_SIDECAR = "mongoproxy.io/sidecar"  # on every injected pod: what PodMonitors select
PROMETHEUS_ANNOTATIONS = ("prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path")

SIDECAR_NAME = "mongoproxy"
INIT_NAME = "mongoproxy-init"
XTABLES_VOLUME = "mongoproxy-xtables"
TLS_VOLUME = "mongoproxy-tls"
TLS_DIR = "/etc/mongoproxy/tls"  # the --tls-secret Secret: tls.crt, tls.key, optionally ca.crt
ADMIN_PORT_NAME = "http-mongoproxy"
DEFAULT_IMAGE = f"mongoproxy:{__version__}"
DEFAULT_GRACE_SECONDS = 30  # Kubernetes' default terminationGracePeriodSeconds
MAX_DRAIN_SECONDS = 15
MAX_PRESTOP_SECONDS = 10

# Where each kind keeps its pod template (metadata + spec); () is the object itself.
POD_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
    "Pod": (),
}
JOB_KINDS = ("Job", "CronJob")

# Flags of `mongoproxy run` that inject itself sets; extra proxy args may not repeat them.
OWNED_RUN_FLAGS = {
    "--proxy": "--proxy-port",
    "--listen-host": "--ipv6",
    "--admin-host": "(none: the admin endpoint must listen on the pod IP for probes and scraping)",
    "--admin-port": "--admin-port",
    "--drain-seconds": f"the annotation {ANN_DRAIN_SECONDS}",
}


@dataclass(frozen=True)
class InjectOptions:
    """Settings from the command line; pod annotations may override the ports, drain and extra args."""

    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    mongo_ports: tuple[str, ...] = ("27017",)
    proxy_port: int = 27111
    admin_port: int = 9898
    proxy_uid: int = 9999
    legacy_sidecar: bool = False
    ipv6: bool = False
    iptables_backend: str = "auto"
    proxy_args: tuple[str, ...] = ()
    drain_seconds: int | None = None  # None: derived from terminationGracePeriodSeconds
    cpu_request: str = "50m"
    memory_request: str = "64Mi"
    cpu_limit: str = "1"
    memory_limit: str = "256Mi"
    metric_labels: str | None = None  # None: the proxy's default label set
    log_commands: bool = False
    tls_secret: str | None = None  # a kubernetes.io/tls Secret mounted at TLS_DIR for the listener
    tls_upstream_ca: bool = False  # the Secret's ca.crt verifies the servers (--upstream-tls)


class AnnotationError(ConfigError):
    """A pod's mongoproxy.io/* annotation has a value that cannot be used; `annotation` names it."""

    def __init__(self, annotation: str, message: str) -> None:
        super().__init__(message)
        self.annotation = annotation


@dataclass
class Report:
    """What happened to each resource, for the notes on stderr."""

    injected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---- values ----


def _port(value: Any, where: str) -> int:
    text = str(value).strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(f"{where} {value!r} is not a port: use an integer from 1 to 65535")
    return int(text)


_QUANTITY = re.compile(r"(\d+(\.\d+)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")


def parse_quantity(value: Any, where: str) -> str:
    """A Kubernetes resource quantity such as 50m, 1, 0.5 or 256Mi."""
    text = str(value).strip()
    if not _QUANTITY.fullmatch(text):
        raise ConfigError(f"{where} {value!r} is not a Kubernetes quantity: use e.g. 100m, 0.5, 128Mi or 1Gi")
    return text


def parse_image(value: Any, where: str = "--image") -> str:
    """An image reference without spaces."""
    image = str(value).strip()
    if not image or any(ch.isspace() for ch in image):
        raise ConfigError(f"{where} {value!r} is not an image reference: give e.g. registry/mongoproxy:0.1.0")
    return image


def parse_switch(value: Any, where: str) -> bool:
    """true/false (also yes/no, on/off, 1/0)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ConfigError(f'{where} {value!r} is not valid: use "true" or "false"')


def _secret_name(value: Any, where: str) -> str | None:
    """A Secret's name; empty means none (an annotation may turn off a ConfigMap's default)."""
    if value is None:
        return None
    name = str(value).strip()
    if not name:
        return None
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", name):
        raise ConfigError(f"{where} {value!r} is not a Secret name: lower-case letters, digits, '-' and '.'")
    return name


def parse_labels(value: Any, where: str) -> str:
    """Metric labels for the proxy's --metric-labels, checked by the metrics sink's own parser."""
    from mongoproxy.sinks.metrics import parse_metric_labels

    try:
        return ",".join(parse_metric_labels(value))
    except ConfigError as exc:
        reason = str(exc).removeprefix("--metric-labels: ").removeprefix("--metric-labels ")
        raise ConfigError(f"{where} {value!r}: {reason}") from None


def check_proxy_args(args: Iterable[str], where: str = "--proxy-args") -> tuple[str, ...]:
    """Extra `mongoproxy run` arguments: every flag must exist and must not be one inject sets."""
    from mongoproxy import config as config_mod

    known = {flag for o in config_mod.all_options() for flag in o.flags} | {"--config"}
    args = tuple(args)
    for token in args:
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        if name in OWNED_RUN_FLAGS:
            raise ConfigError(f"{where}: {name} is set by mongoproxy inject; use {OWNED_RUN_FLAGS[name]} instead")
        if name not in known:
            raise ConfigError(f"{where}: {name} is not a flag of 'mongoproxy run': see 'mongoproxy run --help'")
    return args


def split_proxy_args(text: str, where: str = "--proxy-args") -> tuple[str, ...]:
    """Shell-split one string of extra proxy arguments."""
    try:
        return tuple(shlex.split(text))
    except ValueError as exc:
        raise ConfigError(f"{where} {text!r}: {exc}: quote it like a shell command line") from None


def drain_timing(grace: int, legacy: bool, drain_override: int | None) -> tuple[int, int]:
    """(drain seconds, preStop sleep seconds) so that preStop + drain < terminationGracePeriodSeconds.

    A native sidecar is stopped after the app containers have exited, so it needs no preStop pause;
    a legacy sidecar is signalled with the app and pauses first so the app can finish its work.
    """
    prestop = min(MAX_PRESTOP_SECONDS, grace // 3) if legacy else 0
    drain = min(MAX_DRAIN_SECONDS, grace // 2) if drain_override is None else drain_override
    return drain, prestop


# ---- the containers ----


def _flow(items: Iterable[Any]) -> list:
    """A list written on one line ([a, b]): argument and capability lists read better that way."""
    from ruamel.yaml.comments import CommentedSeq

    seq = CommentedSeq(items)
    seq.fa.set_flow_style()
    return seq


def _http_probe(path: str, port: int, period: int, failures: int, timeout: int = 2) -> dict:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def sidecar_args(opts: InjectOptions, drain: int) -> list[str]:
    """The arguments of the proxy container (after the image's ENTRYPOINT mongoproxy)."""
    return [
        "run",
        "--proxy",
        str(opts.proxy_port),
        # REDIRECT sends local connections to 127.0.0.1 (and ::1 for ip6tables).
        "--listen-host",
        "127.0.0.1,::1" if opts.ipv6 else "127.0.0.1",
        "--admin-host",
        "0.0.0.0,::" if opts.ipv6 else "0.0.0.0",
        "--admin-port",
        str(opts.admin_port),
        "--drain-seconds",
        str(drain),
        *tls_args(opts),
        *opts.proxy_args,
        # After proxy_args: a pod's annotation beats the injector's defaults (the last flag wins).
        *(["--metric-labels", opts.metric_labels] if opts.metric_labels else []),
        *(["--log-commands"] if opts.log_commands else []),
    ]


def tls_args(opts: InjectOptions) -> list[str]:
    """With --tls-secret: the listener's certificate from the mounted Secret, TLS and plaintext both accepted."""
    if not opts.tls_secret:
        return []
    args = ["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key", "--tls-listen", "allow"]
    if opts.tls_upstream_ca:
        args += ["--upstream-tls", "--upstream-tls-ca", f"{TLS_DIR}/ca.crt"]
    return args


def init_args(opts: InjectOptions) -> list[str]:
    """The arguments of the iptables init container."""
    ports = ",".join(p.replace(":", "-") for p in opts.mongo_ports)
    return [
        "init-iptables",
        "--proxy-port",
        str(opts.proxy_port),
        "--mongo-ports",
        ports,
        "--proxy-uid",
        str(opts.proxy_uid),
        *(["--ipv6"] if opts.ipv6 else []),
        *(["--backend", opts.iptables_backend] if opts.iptables_backend != "auto" else []),
    ]


def sidecar_container(opts: InjectOptions, grace: int = DEFAULT_GRACE_SECONDS) -> dict:
    """The proxy container: native sidecar unless opts.legacy_sidecar."""
    drain, prestop = drain_timing(grace, opts.legacy_sidecar, opts.drain_seconds)
    c: dict[str, Any] = {"name": SIDECAR_NAME, "image": opts.image, "imagePullPolicy": opts.image_pull_policy}
    if not opts.legacy_sidecar:
        c["restartPolicy"] = "Always"  # native sidecar: starts before the app, stops after it
    c["args"] = _flow(sidecar_args(opts, drain))
    c["ports"] = [{"name": ADMIN_PORT_NAME, "containerPort": opts.admin_port, "protocol": "TCP"}]
    # Startup on /readyz: with a native sidecar the app starts only once the listener is up.
    c["startupProbe"] = _http_probe("/readyz", opts.admin_port, period=1, failures=60, timeout=1)
    c["livenessProbe"] = _http_probe("/healthz", opts.admin_port, period=10, failures=3)
    c["readinessProbe"] = _http_probe("/readyz", opts.admin_port, period=5, failures=2)
    if prestop:
        c["lifecycle"] = {"preStop": {"exec": {"command": _flow(["sleep", str(prestop)])}}}
    c["resources"] = {
        "requests": {"cpu": opts.cpu_request, "memory": opts.memory_request},
        "limits": {"cpu": opts.cpu_limit, "memory": opts.memory_limit},
    }
    if opts.tls_secret:  # the kubelet updates the files in place when the Secret is renewed: the proxy reloads
        c["volumeMounts"] = [{"name": TLS_VOLUME, "mountPath": TLS_DIR, "readOnly": True}]
    c["securityContext"] = {
        "runAsUser": opts.proxy_uid,
        "runAsGroup": opts.proxy_uid,
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": _flow(["ALL"])},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    return c


def init_container(opts: InjectOptions) -> dict:
    """The init container that installs the nat rules: root with only NET_ADMIN and NET_RAW."""
    return {
        "name": INIT_NAME,
        "image": opts.image,
        "imagePullPolicy": opts.image_pull_policy,
        "args": _flow(init_args(opts)),
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"cpu": "500m", "memory": "128Mi"}},
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": _flow(["ALL"]), "add": _flow(["NET_ADMIN", "NET_RAW"])},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # iptables-legacy takes its lock in /run; the root filesystem stays read-only.
        "volumeMounts": [{"name": XTABLES_VOLUME, "mountPath": "/run"}],
    }


def xtables_volume() -> dict:
    """The small in-memory volume holding the init container's /run."""
    return {"name": XTABLES_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}


# ---- walking the documents ----


def _map_type():
    from ruamel.yaml.comments import CommentedMap

    return CommentedMap


def _is_map(x: Any) -> TypeGuard[dict]:
    return isinstance(x, dict)


def _insert_key(mapping: Any, key: str, value: Any, before: str | None = None) -> None:
    """Add `key` before `before` when both are present (keeps manifests readable), else at the end."""
    if before is not None and before in mapping and hasattr(mapping, "insert"):
        mapping.insert(list(mapping).index(before), key, value)
    else:
        mapping[key] = value


def _name_of(obj: Any) -> str:
    kind = obj.get("kind", "?") if _is_map(obj) else "?"
    meta = obj.get("metadata") if _is_map(obj) else None
    name = meta.get("name") or meta.get("generateName") if _is_map(meta) else None
    return f"{kind}/{name or '?'}"


def _annotations(meta: Any) -> dict:
    ann = meta.get("annotations") if _is_map(meta) else None
    return ann if _is_map(ann) else {}


def _opt_out(value: Any, where: str) -> bool:
    text = str(value).strip().lower()
    if text in ("false", "disabled", "no", "off"):
        return True
    if text in ("true", "enabled", "yes", "on", ""):
        return False
    raise AnnotationError(ANN_INJECT, f'{where}: {ANN_INJECT}: {value!r} is not valid: use "true" or "false"')


def opted_out(annotations: dict, where: str) -> bool:
    """True when `annotations` hold mongoproxy.io/inject: "false"; AnnotationError for a value that is neither."""
    return ANN_INJECT in annotations and _opt_out(annotations[ANN_INJECT], where)


def _drain(value: Any, where: str) -> int:
    text = str(value).strip()
    if not text.isdigit():
        raise ConfigError(f'{where} {text!r} is not a whole number of seconds, e.g. "10"')
    return int(text)


def _extra_args(opts: InjectOptions, value: Any, where: str) -> tuple[str, ...]:
    return opts.proxy_args + check_proxy_args(split_proxy_args(str(value), where), where)


# Per-pod overrides: annotation -> (InjectOptions field, parse(value, where), or parse(opts, value, where)).
# Each annotation is named like the `inject` flag it overrides. A new setting is one row here.
ANNOTATION_OVERRIDES: dict[str, tuple[str, Any]] = {
    ANN_IMAGE: ("image", parse_image),
    ANN_MONGO_PORTS: ("mongo_ports", parse_port_list),
    ANN_PROXY_PORT: ("proxy_port", lambda v, w: _port(v, w)),
    ANN_ADMIN_PORT: ("admin_port", lambda v, w: _port(v, w)),
    ANN_DRAIN_SECONDS: ("drain_seconds", _drain),
    ANN_CPU_REQUEST: ("cpu_request", parse_quantity),
    ANN_MEMORY_REQUEST: ("memory_request", parse_quantity),
    ANN_CPU_LIMIT: ("cpu_limit", parse_quantity),
    ANN_MEMORY_LIMIT: ("memory_limit", parse_quantity),
    ANN_METRIC_LABELS: ("metric_labels", parse_labels),
    ANN_LOG_COMMANDS: ("log_commands", parse_switch),
    ANN_TLS_SECRET: ("tls_secret", _secret_name),
    ANN_TLS_UPSTREAM_CA: ("tls_upstream_ca", parse_switch),
    ANN_PROXY_ARGS: ("proxy_args", None),  # added to the flag's arguments, not replacing them
}


def _effective_options(opts: InjectOptions, annotations: dict, where: str) -> InjectOptions:
    """Command-line options with this pod's mongoproxy.io/* overrides applied; AnnotationError names a bad one."""
    changes: dict[str, Any] = {}
    for key, (attr, parse) in ANNOTATION_OVERRIDES.items():
        if key not in annotations:
            continue
        try:
            if parse is None:
                changes[attr] = _extra_args(opts, annotations[key], f"{where}: {key}")
            else:
                changes[attr] = parse(annotations[key], f"{where}: {key}")
        except AnnotationError:
            raise
        except ConfigError as exc:
            raise AnnotationError(key, str(exc)) from None
    if not changes:
        return opts
    opts = replace(opts, **changes)
    if opts.tls_upstream_ca and not opts.tls_secret:
        key = ANN_TLS_UPSTREAM_CA if "tls_upstream_ca" in changes else ANN_TLS_SECRET
        raise AnnotationError(key, f"{where}: {key}: {_TLS_UPSTREAM_CA_NEEDS_SECRET}")
    return opts


def _check_ports(opts: InjectOptions, where: str) -> None:
    if opts.proxy_port == opts.admin_port:
        raise ConfigError(
            f"{where}: proxy port and admin port are both {opts.proxy_port}: give them different "
            "ports (--proxy-port, --admin-port)"
        )
    if port_in(opts.proxy_port, opts.mongo_ports):
        raise ConfigError(
            f"{where}: proxy port {opts.proxy_port} is one of the MongoDB ports "
            f"{','.join(opts.mongo_ports)}: choose another --proxy-port"
        )
    if port_in(opts.admin_port, opts.mongo_ports):
        raise ConfigError(
            f"{where}: admin port {opts.admin_port} is one of the MongoDB ports "
            f"{','.join(opts.mongo_ports)}: choose another --admin-port"
        )


class _Status:
    """What an earlier injection added (the JSON in mongoproxy.io/injected)."""

    def __init__(self, raw: Any, where: str) -> None:
        self.init_containers: list[str] = []
        self.containers: list[str] = []
        self.volumes: list[str] = []
        self.annotations: list[str] = []
        self.labels: list[str] = []
        self.grace: Any = None  # terminationGracePeriodSeconds before injection: a number, "unset", or None
        if raw is None:
            return
        try:
            data = json.loads(str(raw))
            self.init_containers = [str(x) for x in data.get("initContainers", [])]
            self.containers = [str(x) for x in data.get("containers", [])]
            self.volumes = [str(x) for x in data.get("volumes", [])]
            self.annotations = [str(x) for x in data.get("annotations", [])]
            self.labels = [str(x) for x in data.get("labels", [])]
            self.grace = data.get("grace")
        except (ValueError, AttributeError, TypeError):
            raise ConfigError(
                f"{where}: annotation {ANN_STATUS} is not what mongoproxy inject writes: remove it "
                "(and any mongoproxy containers) and inject again"
            ) from None

    @staticmethod
    def render(
        init_containers: list[str],
        containers: list[str],
        volumes: list[str],
        annotations: list[str],
        labels: list[str],
        grace: Any = None,
    ) -> str:
        data = {
            "version": __version__,
            "initContainers": init_containers,
            "containers": containers,
            "volumes": volumes,
            "annotations": annotations,
            "labels": labels,
            "grace": grace,
        }
        return json.dumps({k: v for k, v in data.items() if v}, separators=(",", ":"))


def _remove_named(seq: Any, names: Iterable[str]) -> None:
    names = set(names)
    if isinstance(seq, list):
        for i in reversed(range(len(seq))):
            if _is_map(seq[i]) and seq[i].get("name") in names:
                del seq[i]


def _container_names(spec: dict) -> dict[str, str]:
    out = {}
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(key) or ():
            if _is_map(c) and "name" in c:
                out[str(c["name"])] = key
    return out


def inject_pod(
    meta: Any,
    spec: Any,
    opts: InjectOptions,
    where: str,
    kind: str,
    report: Report,
    workload_annotations: dict | None = None,
) -> bool:
    """Add the sidecar to one pod template (`meta`, `spec`) in place; False when the pod is skipped."""
    if not _is_map(spec):
        raise ConfigError(f"{where}: the pod template has no spec: fix the manifest")
    annotations = dict(workload_annotations or {})
    annotations.update(_annotations(meta))
    if opted_out(annotations, where):
        report.notes.append(f'{where}: skipped ({ANN_INJECT}: "false")')
        return False
    if spec.get("hostNetwork") is True:
        report.notes.append(
            f"{where}: skipped: hostNetwork pods share the node's network namespace, where the "
            "redirect rules would capture the whole node's MongoDB traffic"
        )
        return False
    opts = _effective_options(opts, annotations, where)
    _check_ports(opts, where)

    meta_ann = _annotations(meta)
    status = _Status(meta_ann.get(ANN_STATUS), where)
    # Remove what an earlier run added, so a rerun replaces it in place.
    _remove_named(spec.get("initContainers"), status.init_containers)
    _remove_named(spec.get("containers"), status.containers)
    _remove_named(spec.get("volumes"), status.volumes)
    for key in (*status.annotations, ANN_STATUS):
        meta_ann.pop(key, None)
    if _is_map(meta) and _is_map(meta.get("labels")):
        for key in status.labels:
            meta["labels"].pop(key, None)
    if status.grace == "unset":
        spec.pop("terminationGracePeriodSeconds", None)
    elif status.grace is not None:
        spec["terminationGracePeriodSeconds"] = status.grace

    names = _container_names(spec)
    for ours in (SIDECAR_NAME, INIT_NAME):
        if ours in names:
            raise ConfigError(
                f"{where}: it already has a container named {ours!r} that mongoproxy inject did not "
                f'add: rename that container, or opt the workload out with {ANN_INJECT}: "false"'
            )
    for volume in (XTABLES_VOLUME, TLS_VOLUME):
        if any(_is_map(v) and v.get("name") == volume for v in spec.get("volumes") or ()):
            raise ConfigError(f"{where}: it already has a volume named {volume!r}: rename that volume")
    for key in ("initContainers", "containers"):
        for c in spec.get(key) or ():
            for p in (c.get("ports") or ()) if _is_map(c) else ():
                port = p.get("containerPort") if _is_map(p) else None
                for what, ours_port, flag in (
                    ("proxy", opts.proxy_port, "--proxy-port"),
                    ("admin", opts.admin_port, "--admin-port"),
                ):
                    if port is not None and str(port) == str(ours_port):
                        raise ConfigError(
                            f"{where}: container {c.get('name')!r} already uses port {port}, the "
                            f"mongoproxy {what} port: choose another with {flag} or the annotation "
                            f"{ANNOTATION_PREFIX}{what}-port"
                        )
    _check_uids(spec, opts, where)

    original_grace = spec.get("terminationGracePeriodSeconds", "unset")
    grace_raw = spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
    try:
        grace = int(grace_raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: terminationGracePeriodSeconds {grace_raw!r} is not a number") from None
    drain, prestop = drain_timing(grace, opts.legacy_sidecar, opts.drain_seconds)
    # The pod's grace period must hold the preStop pause, the drain and the shutdown margin (closing the sinks).
    needed = grace_seconds(drain, prestop)
    if grace < needed:
        report.notes.append(
            f"{where}: terminationGracePeriodSeconds raised from {grace} to {needed} so that the preStop pause "
            f"({prestop}s), the drain ({drain}s) and the shutdown margin ({SHUTDOWN_MARGIN_SECONDS:g}s) fit"
        )
        grace = needed
    if "terminationGracePeriodSeconds" in spec:
        spec["terminationGracePeriodSeconds"] = grace
    else:
        _insert_key(
            spec,
            "terminationGracePeriodSeconds",
            grace,
            before="initContainers" if "initContainers" in spec else "containers",
        )

    cmap = _map_type()
    init_list = spec.get("initContainers")
    if not isinstance(init_list, list):
        init_list = []
        _insert_key(spec, "initContainers", init_list, before="containers")
    added_init = [INIT_NAME]
    added_containers: list[str] = []
    if opts.legacy_sidecar:
        # Last, so the app's own init containers still reach MongoDB directly.
        init_list.append(init_container(opts))
        containers = spec.get("containers")
        if not isinstance(containers, list):
            raise ConfigError(f"{where}: the pod template has no containers: fix the manifest")
        containers.append(sidecar_container(opts, grace))
        added_containers.append(SIDECAR_NAME)
        if kind in JOB_KINDS:
            report.notes.append(
                f"{where}: a legacy sidecar never exits, so this {kind} never completes: use native "
                "sidecars (drop --legacy-sidecar; Kubernetes >= 1.29)"
            )
    else:
        # First, so every later init container and the app already talk through the proxy.
        init_list.insert(0, sidecar_container(opts, grace))
        init_list.insert(0, init_container(opts))
        added_init.append(SIDECAR_NAME)
    volumes = spec.get("volumes")
    if not isinstance(volumes, list):
        volumes = []
        spec["volumes"] = volumes
    volumes.append(xtables_volume())
    added_volumes = [XTABLES_VOLUME]
    if opts.tls_secret:
        volumes.append({"name": TLS_VOLUME, "secret": {"secretName": opts.tls_secret}})
        added_volumes.append(TLS_VOLUME)

    if not _is_map(meta):
        raise ConfigError(f"{where}: the pod template's metadata is not a mapping: fix the manifest")
    if not _is_map(meta.get("annotations")):
        _insert_key(meta, "annotations", cmap(), before=None)
    ann = meta["annotations"]
    added_ann: list[str] = []
    existing_port = ann.get("prometheus.io/port")
    if existing_port is not None and str(existing_port) != str(opts.admin_port):
        report.notes.append(
            f"{where}: prometheus.io/port is already {existing_port} (the app's own metrics), so "
            "no scrape annotations were added: scrape mongoproxy with deploy/podmonitor.yaml"
        )
    else:
        for key, value in zip(PROMETHEUS_ANNOTATIONS, ("true", str(opts.admin_port), "/metrics")):
            if key not in ann:
                ann[key] = value
                added_ann.append(key)
    if opts.legacy_sidecar and ANN_DEFAULT_CONTAINER not in ann:
        app = next(
            (c.get("name") for c in spec.get("containers") or () if _is_map(c) and c.get("name") != SIDECAR_NAME), None
        )
        if app:
            ann[ANN_DEFAULT_CONTAINER] = str(app)  # kubectl logs/exec keep going to the app
            added_ann.append(ANN_DEFAULT_CONTAINER)
    added_labels: list[str] = []
    if not _is_map(meta.get("labels")):
        _insert_key(meta, "labels", cmap(), before="annotations")
    if LABEL_SIDECAR not in meta["labels"]:
        meta["labels"][LABEL_SIDECAR] = "true"
        added_labels.append(LABEL_SIDECAR)
    ann[ANN_STATUS] = _Status.render(
        added_init, added_containers, added_volumes, added_ann, added_labels, original_grace
    )
    report.injected.append(where)
    return True


def _check_uids(spec: dict, opts: InjectOptions, where: str) -> None:
    """An app container running as the proxy's uid would bypass the redirect unobserved."""
    pod_uid = (spec.get("securityContext") or {}).get("runAsUser") if _is_map(spec.get("securityContext")) else None
    for key in ("initContainers", "containers"):
        for c in spec.get(key) or ():
            if not _is_map(c) or c.get("name") in (SIDECAR_NAME, INIT_NAME):
                continue
            sc = c.get("securityContext")
            uid = sc.get("runAsUser", pod_uid) if _is_map(sc) else pod_uid
            if uid is not None and str(uid) == str(opts.proxy_uid):
                raise ConfigError(
                    f"{where}: container {c.get('name')!r} runs as uid {uid}, the proxy's uid, so its "
                    "MongoDB connections would bypass the proxy: choose another --proxy-uid"
                )


def _resolve(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not _is_map(obj):
            return None
        obj = obj.get(key)
    return obj


def inject_object(obj: Any, opts: InjectOptions, report: Report, where: str = "") -> None:
    """Inject into one parsed document in place (recursing into `List` items)."""
    if obj is None:
        return
    if not _is_map(obj) or "kind" not in obj:
        report.notes.append(f"{where or 'a document'} is not a Kubernetes object (no kind): passed through unchanged")
        return
    kind = str(obj.get("kind"))
    name = _name_of(obj)
    if isinstance(obj.get("items"), list) and (kind == "List" or kind.endswith("List")):
        for i, item in enumerate(obj["items"]):
            inject_object(item, opts, report, f"{name} item {i}")
        return
    path = POD_TEMPLATE_PATHS.get(kind)
    if path is None:
        report.notes.append(f"{name} has no pod template: passed through unchanged")
        return
    template = _resolve(obj, path)
    if not _is_map(template):
        raise ConfigError(f"{name}: {'.'.join(path) or 'the object'} is missing: fix the manifest")
    if "metadata" not in template or template.get("metadata") is None:
        cmap = _map_type()
        _insert_key(template, "metadata", cmap(), before="spec")
    workload_ann = _annotations(obj.get("metadata")) if path else {}
    inject_pod(template["metadata"], template.get("spec"), opts, name, kind, report, workload_ann)


# ---- YAML in and out ----


def _guess_indent(doc: Any) -> tuple[int, int, int]:
    """(mapping, sequence, offset) indentation used by a loaded document; kubectl's style when unknown."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    mapping = sequence = offset = None
    stack = [doc]
    seen = 0
    while stack and seen < 10000 and (mapping is None or sequence is None):
        node = stack.pop()
        seen += 1
        if isinstance(node, CommentedMap):
            if node.fa.flow_style():
                continue
            for key in node:
                value = node[key]
                try:
                    kline, kcol = node.lc.key(key)
                except (KeyError, TypeError, AttributeError):
                    continue
                if mapping is None and isinstance(value, CommentedMap) and value and not value.fa.flow_style():
                    first = next(iter(value))
                    vline, vcol = value.lc.key(first)
                    if vline > kline:
                        mapping = vcol - kcol
                if sequence is None and isinstance(value, CommentedSeq) and value and not value.fa.flow_style():
                    dline, dcol = value.lc.line, value.lc.col
                    iline, icol = value.lc.item(0)
                    if dline > kline:
                        offset, sequence = dcol - kcol, icol - kcol
                stack.append(value)
        elif isinstance(node, CommentedSeq):
            stack.extend(node)
    mapping = mapping if mapping and mapping > 0 else 2
    if sequence is None or offset is None or offset < 0 or sequence < offset + 2:
        sequence, offset = mapping, 0
    return mapping, sequence, offset


def _yaml(indent: tuple[int, int, int] = (2, 2, 0)):
    try:
        from ruamel.yaml import YAML
    except ImportError:  # pragma: no cover - a dependency of the package
        raise ConfigError("mongoproxy inject needs ruamel.yaml: pip install ruamel.yaml") from None
    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.width = 4096  # never fold long lines (args, JSON annotations)
    y.indent(mapping=indent[0], sequence=indent[1], offset=indent[2])
    return y


def load_documents(text: str, source: str) -> list[Any]:
    """Every YAML document in `text`; invalid YAML is one ConfigError naming the place."""
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    try:
        return list(_yaml().load_all(text))
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(exc.problem or exc.context or "syntax error").split())
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}: fix the document") from None
    except YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(exc).split())}: fix the document") from None


def dump_documents(docs: list[Any], explicit_start: bool) -> str:
    """The documents back as YAML, each with the indentation it came with."""
    out = io.StringIO()
    first = True
    for doc in docs:
        if doc is None:
            continue  # an empty document carries nothing for kubectl
        if not first or explicit_start:
            out.write("---\n")
        first = False
        buf = io.StringIO()
        _yaml(_guess_indent(doc)).dump(doc, buf)
        out.write(buf.getvalue())
    return out.getvalue()


def _starts_explicit(text: str) -> bool:
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("%"):
            continue
        return stripped == "---" or stripped.startswith("--- ")
    return False


def inject_text(text: str, opts: InjectOptions, source: str = "<stdin>", report: Report | None = None) -> str:
    """Inject into every pod template of the YAML `text`; returns the new YAML."""
    report = report if report is not None else Report()
    docs = load_documents(text, source)
    for i, doc in enumerate(docs):
        inject_object(doc, opts, report, f"{source} document {i + 1}")
    return dump_documents(docs, _starts_explicit(text))


# ---- the sub-command ----


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


def _proxy_args(value: Any, where: str) -> tuple[str, ...]:
    # One shell-quoted string, or a list of them (the repeatable flag; a TOML array).
    texts = [value] if isinstance(value, str) else list(value or ())
    extra: tuple[str, ...] = ()
    for text in texts:
        extra += split_proxy_args(str(text), where)
    return check_proxy_args(extra, where)


def _choice(choices: tuple[str, ...]):
    def parse(value: Any, where: str) -> str:
        if str(value) not in choices:
            raise ConfigError(f"{where} {value!r} is not valid: use one of {', '.join(choices)}")
        return str(value)

    return parse


# Injection settings by name (the flags of `inject` with underscores): parse(value, flag). The webhook's
# --config file and ConfigMap use the same names, so `inject` and the webhook read defaults one way.
SETTINGS: dict[str, Any] = {
    "image": parse_image,
    "image_pull_policy": _choice(("Always", "IfNotPresent", "Never")),
    "mongo_ports": parse_port_list,
    "proxy_port": _port,
    "admin_port": _port,
    "proxy_uid": lambda v, w: parse_uid(str(v)),
    "legacy_sidecar": parse_switch,
    "ipv6": parse_switch,
    "iptables_backend": _choice(("auto", "nft", "legacy")),
    "proxy_args": _proxy_args,
    "cpu_request": parse_quantity,
    "memory_request": parse_quantity,
    "cpu_limit": parse_quantity,
    "memory_limit": parse_quantity,
    "metric_labels": parse_labels,
    "log_commands": parse_switch,
    "tls_secret": _secret_name,
    "tls_upstream_ca": parse_switch,
}
_TLS_UPSTREAM_CA_NEEDS_SECRET = "--tls-upstream-ca uses the ca.crt of --tls-secret: give --tls-secret NAME"


def options_from_settings(values: dict[str, Any], source: str = "") -> InjectOptions:
    """InjectOptions from raw settings named like the flags (TOML values or strings); ConfigError names the fix."""
    prefix = f"{source}: " if source else ""
    unknown = sorted(set(values) - set(SETTINGS))
    if unknown:
        raise ConfigError(
            f"{prefix}unknown injection setting(s) {', '.join(unknown)}: valid names are {', '.join(SETTINGS)}"
        )
    parsed: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        try:
            parsed[name] = SETTINGS[name](value, flag)
        except ConfigError as exc:
            raise ConfigError(f"{prefix}{exc}") from None
    opts = InjectOptions(**parsed)
    _check_ports(opts, source or "flags")
    if opts.tls_upstream_ca and not opts.tls_secret:
        raise ConfigError(f"{prefix}{_TLS_UPSTREAM_CA_NEEDS_SECRET}")
    return opts


def options_from_args(args: argparse.Namespace) -> InjectOptions:
    """InjectOptions from parsed flags; ConfigError names the fix."""
    return options_from_settings({name: getattr(args, name, None) for name in SETTINGS})


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
