"""Pod mutation: add the sidecar to one pod template in place, replacing an earlier injection. Shared with the admission webhook."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from mongoproxy import __version__
from mongoproxy.errors import ConfigError
from mongoproxy.inject.containers import drain_timing, init_container, sidecar_container, xtables_volume
from mongoproxy.inject.names import (
    ANN_DEFAULT_CONTAINER,
    ANN_INJECT,
    ANN_STATUS,
    ANNOTATION_PREFIX,
    DEFAULT_GRACE_SECONDS,
    INIT_NAME,
    JOB_KINDS,
    LABEL_SIDECAR,
    PROMETHEUS_ANNOTATIONS,
    SIDECAR_NAME,
    TLS_VOLUME,
    XTABLES_VOLUME,
)
from mongoproxy.inject.settings import AnnotationError, InjectOptions, _check_ports, _effective_options
from mongoproxy.shutdown import SHUTDOWN_MARGIN_SECONDS, grace_seconds


@dataclass
class Report:
    """What happened to each resource, for the notes on stderr."""

    injected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---- the pod template's mappings (ruamel round-trip maps or plain dicts) ----


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
