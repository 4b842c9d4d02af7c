"""The containers and volume inject adds to a pod: the proxy sidecar, the iptables init container, their arguments and timing."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mongoproxy.inject.names import (
    ADMIN_PORT_NAME,
    DEFAULT_GRACE_SECONDS,
    INIT_NAME,
    MAX_DRAIN_SECONDS,
    MAX_PRESTOP_SECONDS,
    SIDECAR_NAME,
    TLS_DIR,
    TLS_VOLUME,
    XTABLES_VOLUME,
)
from mongoproxy.inject.settings import InjectOptions


def drain_timing(grace: int, legacy: bool, drain_override: int | None) -> tuple[int, int]:
    """(drain seconds, preStop sleep seconds) so that preStop + drain < terminationGracePeriodSeconds.

    A native sidecar is stopped after the app containers have exited, so it needs no preStop pause;
    a legacy sidecar is signalled with the app and pauses first so the app can finish its work.
    """
    prestop = min(MAX_PRESTOP_SECONDS, grace // 3) if legacy else 0
    drain = min(MAX_DRAIN_SECONDS, grace // 2) if drain_override is None else drain_override
    return drain, prestop


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
