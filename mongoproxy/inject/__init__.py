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

This package's one job is to be the public face of inject: every name is importable from
`mongoproxy.inject` as before the split. Its modules, one job each (each imports only those listed above it):
  names       annotation keys, labels, container and volume names, pod-template paths by kind
  settings    InjectOptions, value parsers, the SETTINGS table, per-pod annotation overrides
  containers  the sidecar and init containers and the volume inject adds
  pod         inject_pod: one pod template mutated in place (shared with the admission webhook)
  documents   the YAML round trip and the walk to each pod template
  cli         the `mongoproxy inject` sub-command (add_parser, handler)
"""

from __future__ import annotations

from mongoproxy.inject.cli import add_parser, handler
from mongoproxy.inject.containers import (
    drain_timing,
    init_args,
    init_container,
    sidecar_args,
    sidecar_container,
    tls_args,
    xtables_volume,
)
from mongoproxy.inject.documents import dump_documents, inject_object, inject_text, load_documents
from mongoproxy.inject.names import (
    ADMIN_PORT_NAME,
    ANN_ADMIN_PORT,
    ANN_CPU_LIMIT,
    ANN_CPU_REQUEST,
    ANN_DEFAULT_CONTAINER,
    ANN_DRAIN_SECONDS,
    ANN_IMAGE,
    ANN_INJECT,
    ANN_LOG_COMMANDS,
    ANN_MEMORY_LIMIT,
    ANN_MEMORY_REQUEST,
    ANN_METRIC_LABELS,
    ANN_MONGO_PORTS,
    ANN_PROXY_ARGS,
    ANN_PROXY_PORT,
    ANN_STATUS,
    ANN_TLS_SECRET,
    ANN_TLS_UPSTREAM_CA,
    ANNOTATION_PREFIX,
    DEFAULT_GRACE_SECONDS,
    DEFAULT_IMAGE,
    INIT_NAME,
    JOB_KINDS,
    LABEL_SIDECAR,
    MAX_DRAIN_SECONDS,
    MAX_PRESTOP_SECONDS,
    POD_TEMPLATE_PATHS,
    PROMETHEUS_ANNOTATIONS,
    SIDECAR_NAME,
    TLS_DIR,
    TLS_VOLUME,
    XTABLES_VOLUME,
)
from mongoproxy.inject.pod import Report, inject_pod, opted_out
from mongoproxy.inject.settings import (
    ANNOTATION_OVERRIDES,
    OWNED_RUN_FLAGS,
    SETTINGS,
    AnnotationError,
    InjectOptions,
    check_proxy_args,
    options_from_args,
    options_from_settings,
    parse_image,
    parse_labels,
    parse_quantity,
    parse_switch,
    split_proxy_args,
)

__all__ = [
    "ADMIN_PORT_NAME",
    "ANNOTATION_OVERRIDES",
    "ANNOTATION_PREFIX",
    "ANN_ADMIN_PORT",
    "ANN_CPU_LIMIT",
    "ANN_CPU_REQUEST",
    "ANN_DEFAULT_CONTAINER",
    "ANN_DRAIN_SECONDS",
    "ANN_IMAGE",
    "ANN_INJECT",
    "ANN_LOG_COMMANDS",
    "ANN_MEMORY_LIMIT",
    "ANN_MEMORY_REQUEST",
    "ANN_METRIC_LABELS",
    "ANN_MONGO_PORTS",
    "ANN_PROXY_ARGS",
    "ANN_PROXY_PORT",
    "ANN_STATUS",
    "ANN_TLS_SECRET",
    "ANN_TLS_UPSTREAM_CA",
    "AnnotationError",
    "DEFAULT_GRACE_SECONDS",
    "DEFAULT_IMAGE",
    "INIT_NAME",
    "InjectOptions",
    "JOB_KINDS",
    "LABEL_SIDECAR",
    "MAX_DRAIN_SECONDS",
    "MAX_PRESTOP_SECONDS",
    "OWNED_RUN_FLAGS",
    "POD_TEMPLATE_PATHS",
    "PROMETHEUS_ANNOTATIONS",
    "Report",
    "SETTINGS",
    "SIDECAR_NAME",
    "TLS_DIR",
    "TLS_VOLUME",
    "XTABLES_VOLUME",
    "add_parser",
    "check_proxy_args",
    "drain_timing",
    "dump_documents",
    "handler",
    "init_args",
    "init_container",
    "inject_object",
    "inject_pod",
    "inject_text",
    "load_documents",
    "opted_out",
    "options_from_args",
    "options_from_settings",
    "parse_image",
    "parse_labels",
    "parse_quantity",
    "parse_switch",
    "sidecar_args",
    "sidecar_container",
    "split_proxy_args",
    "tls_args",
    "xtables_volume",
]
