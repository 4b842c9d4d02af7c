"""The names and kinds inject writes into and reads from Kubernetes objects: annotations, labels, containers, volumes."""

from __future__ import annotations

from mongoproxy import __version__

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
