"""`mongoproxy webhook` over real HTTPS: its JSONPatch applied with `jsonpatch` equals `mongoproxy inject`'s output.

The AdmissionReviews carry pods built with the official `kubernetes` models from every pod template in
deploy/examples/ and in inject's golden inputs (every workload kind). The webhook runs as a subprocess with
the ConfigMap's defaults (deploy/webhook/base/inject.toml) and certificates made here (trustme).
"""

from __future__ import annotations

import base64
import copy
import inspect
import io
import json
import os
import threading
import time
import uuid
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import jsonpatch
import pytest
from ruamel.yaml import YAML

from mongoproxy import cli, inject
from tests.support.webhook import Certs, WebhookProcess

ROOT = Path(__file__).resolve().parents[2]
CONFIGMAP_DEFAULTS = ROOT / "deploy" / "webhook" / "base" / "inject.toml"
SOURCES = sorted((ROOT / "deploy" / "examples").glob("*.yaml")) + sorted(
    (ROOT / "tests" / "unit" / "golden" / "inject").glob("*.in.yaml")
)
# The controller that creates the pods of each workload kind (what their ownerReferences name).
OWNER = {"Deployment": "ReplicaSet", "CronJob": "Job"}


# ---- building requests with the kubernetes models ----


def deserialize(doc: dict, model: str):
    """`doc` as the official client's model `model` (before and after its pydantic rewrite)."""
    from kubernetes.client import ApiClient

    api, text = ApiClient(), json.dumps(doc)
    if "content_type" in inspect.signature(api.deserialize).parameters:
        return api.deserialize(text, model, "application/json")

    class Response:
        data = text

    return api.deserialize(Response(), model)


def serialize(model) -> dict:
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(model)


def drop_nulls(value):
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def load_all(path: Path) -> list[dict]:
    return [json.loads(json.dumps(d)) for d in YAML(typ="safe").load_all(path.read_text()) if d is not None]


def workloads() -> list[tuple[str, Path, int, dict]]:
    """(id, file, document index, object) for every object with a pod template, List items included."""
    out = []
    for path in SOURCES:
        for i, doc in enumerate(load_all(path)):
            for j, obj in enumerate(doc["items"] if doc.get("kind") == "List" else [doc]):
                if obj.get("kind") in inject.POD_TEMPLATE_PATHS:
                    ident = f"{path.parent.name}/{path.name}#{i}.{j}:{obj['kind']}/{obj['metadata']['name']}"
                    out.append((ident, path, i, obj))
    return out


def pod_of(obj: dict, namespace: str = "shop") -> dict:
    """The Pod a controller would create from `obj`'s template (a Pod is itself), through the V1Pod model."""
    from kubernetes.client import V1ObjectMeta, V1OwnerReference, V1Pod

    kind = obj["kind"]
    if kind == "Pod":
        pod = deserialize(obj, "V1Pod")
    else:
        template = obj
        for key in inject.POD_TEMPLATE_PATHS[kind]:
            template = template[key]
        t = deserialize(template, "V1PodTemplateSpec")
        owner = OWNER.get(kind, kind)
        meta = t.metadata or V1ObjectMeta()
        meta.generate_name = f"{obj['metadata']['name']}-7f9c-"
        meta.owner_references = [
            V1OwnerReference(
                api_version="batch/v1" if owner == "Job" else "apps/v1",
                kind=owner,
                name=f"{obj['metadata']['name']}-7f9c",
                uid=str(uuid.UUID(int=7)),
                controller=True,
            )
        ]
        pod = V1Pod(api_version="v1", kind="Pod", metadata=meta, spec=t.spec)
    pod.metadata.namespace = pod.metadata.namespace or namespace
    return serialize(pod)


def app_pod() -> dict:
    """The pod of deploy/examples/app.yaml's Deployment."""
    (obj,) = [w[3] for w in workloads() if w[1].name == "app.yaml" and w[3]["kind"] == "Deployment"]
    return pod_of(obj)


def admission_review(pod: dict, operation: str = "CREATE") -> dict:
    """An AdmissionReview v1 request for `pod`, the user info from the V1UserInfo model."""
    from kubernetes.client import V1UserInfo

    user = V1UserInfo(
        username="system:serviceaccount:kube-system:replicaset-controller", groups=["system:authenticated"]
    )
    gvk = {"group": "", "version": "v1", "kind": "Pod"}
    gvr = {"group": "", "version": "v1", "resource": "pods"}
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": gvk,
            "resource": gvr,
            "requestKind": gvk,
            "requestResource": gvr,
            "name": pod["metadata"].get("name", ""),
            "namespace": pod["metadata"]["namespace"],
            "operation": operation,
            "userInfo": serialize(user),
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def patched(pod: dict, response: dict) -> dict:
    """`pod` with the response's JSONPatch applied by the jsonpatch library."""
    resp = response["response"]
    if "patch" not in resp:
        return copy.deepcopy(pod)
    assert resp["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(resp["patch"]))
    return jsonpatch.JsonPatch(ops).apply(pod)


def run_inject(path: Path, *flags: str) -> tuple[int, str, str]:
    """`mongoproxy inject FILE FLAGS` through the real CLI: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(["inject", str(path), *flags])
    return code, out.getvalue(), err.getvalue()


def inject_pod_file(pod: dict, tmp_path: Path, *flags: str) -> tuple[int, dict | None, str]:
    """`mongoproxy inject` of the Pod manifest `pod`: (exit code, the injected pod, stderr)."""
    src = tmp_path / f"pod-{uuid.uuid4().hex[:8]}.yaml"
    src.write_text(json.dumps(pod))
    code, out, err = run_inject(src, *flags)
    docs = [json.loads(json.dumps(d)) for d in YAML(typ="safe").load_all(out) if d is not None]
    return code, (docs[0] if docs else None), err


# ---- the server ----


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return Certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def webhook(certs):
    hook = WebhookProcess(certs, "--reload-seconds", "0.1", config=CONFIGMAP_DEFAULTS).start()
    yield hook
    assert hook.stop() == 0, hook.stderr_text()


def _where_free(message: str) -> str:
    """An error line without its leading 'Kind/name: ' (inject and the webhook name the pod differently)."""
    return message.split(": ", 1)[1]


# ---- one function, two faces ----


@pytest.mark.parametrize("ident,path,index,obj", workloads(), ids=[w[0] for w in workloads()])
def test_patch_equals_inject_output(webhook, tmp_path, ident, path, index, obj):
    pod = pod_of(obj)
    response = webhook.review(admission_review(pod))
    resp = response["response"]
    assert resp["allowed"] is True
    code, expected, err = inject_pod_file(pod, tmp_path)
    if code != 0:
        # inject refuses this pod (e.g. the front proxy already has a container named mongoproxy):
        # the webhook allows it unchanged, with the same reason as a warning.
        assert "patch" not in resp
        (warning,) = resp["warnings"]
        assert warning.startswith("mongoproxy: sidecar not injected: ")
        assert _where_free(warning.removeprefix("mongoproxy: sidecar not injected: ")) == _where_free(
            err.strip().removeprefix("mongoproxy: error: ")
        )
        return
    result = patched(pod, response)
    assert result == expected
    if inject.ANN_STATUS in ((pod["metadata"].get("annotations")) or {}):
        assert "patch" not in resp  # deploy/examples/app-injected.yaml: already injected
    else:
        assert inject.ANN_STATUS in result["metadata"]["annotations"]

    # The same template injected inside its workload (the usual `inject -f app.yaml`) gives the same pod,
    # unless the workload itself carries mongoproxy.io annotations (a pod never sees those).
    workload_ann = obj["metadata"].get("annotations") or {}
    if obj["kind"] != "Pod" and not any(k.startswith(inject.ANNOTATION_PREFIX) for k in workload_ann):
        code, out, _ = run_inject(path)
        assert code == 0
        doc = [d for d in YAML(typ="safe").load_all(out) if d is not None][index]
        doc = json.loads(json.dumps(doc))
        items = doc["items"] if doc.get("kind") == "List" else [doc]
        template = next(item for item in items if item["metadata"]["name"] == obj["metadata"]["name"])
        for key in inject.POD_TEMPLATE_PATHS[obj["kind"]]:
            template = template[key]
        meta = {
            k: v for k, v in result["metadata"].items() if k not in ("namespace", "generateName", "ownerReferences")
        }
        # (the pod went through the V1Pod model, which drops nulls such as creationTimestamp: null)
        assert (meta, result["spec"]) == (drop_nulls(template["metadata"]), drop_nulls(template["spec"]))

    # Reinvocation (reinvocationPolicy: IfNeeded) of the injected pod: an empty patch.
    again = webhook.review(admission_review(result))["response"]
    assert again["allowed"] is True and "patch" not in again and "warnings" not in again


def test_annotation_overrides_match_inject(webhook, tmp_path):
    """Per-pod annotations, named like inject's flags, give the same pod through both faces."""
    (obj,) = [w[3] for w in workloads() if w[1].name == "pod.in.yaml"]
    pod = pod_of(obj)
    pod["metadata"].setdefault("annotations", {}).update(
        {
            inject.ANN_IMAGE: "registry.example/mongoproxy:9.9",
            inject.ANN_CPU_LIMIT: "250m",
            inject.ANN_MEMORY_REQUEST: "96Mi",
            inject.ANN_METRIC_LABELS: "op,db,collection",
            inject.ANN_LOG_COMMANDS: "true",
            inject.ANN_MONGO_PORTS: "27017,27018",
            inject.ANN_PROXY_ARGS: "--slow-ms 50",
        }
    )
    response = webhook.review(admission_review(pod))
    result = patched(pod, response)
    code, expected, _ = inject_pod_file(pod, tmp_path)
    assert code == 0 and result == expected
    sidecar = next(c for c in result["spec"]["initContainers"] if c["name"] == inject.SIDECAR_NAME)
    assert sidecar["image"] == "registry.example/mongoproxy:9.9"
    assert sidecar["resources"]["limits"]["cpu"] == "250m"
    run_args = cli.build_parser().parse_args(sidecar["args"])
    assert (run_args.metric_labels, run_args.log_commands, run_args.slow_ms) == ("op,db,collection", True, "50")


def _tls_facts(pod: dict) -> tuple[str, list[str]]:
    """The mounted Secret's name and the sidecar's TLS flags."""
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == inject.TLS_VOLUME]
    sidecar = next(c for c in pod["spec"]["initContainers"] if c["name"] == inject.SIDECAR_NAME)
    return volume["secret"]["secretName"], [a for a in sidecar["args"] if a.startswith(("--tls", "--upstream-tls"))]


def test_tls_by_annotation_equals_inject_tls_flags(webhook, tmp_path):
    """mongoproxy.io/tls-secret and tls-upstream-ca give the pod that `inject --tls-secret --tls-upstream-ca` gives."""
    pod = app_pod()
    annotated = copy.deepcopy(pod)
    annotated["metadata"].setdefault("annotations", {}).update(
        {inject.ANN_TLS_SECRET: "orders-mongoproxy-tls", inject.ANN_TLS_UPSTREAM_CA: "true"}
    )
    result = patched(annotated, webhook.review(admission_review(annotated)))
    code, expected, _ = inject_pod_file(annotated, tmp_path)
    assert code == 0 and result == expected
    code, by_flags, _ = inject_pod_file(pod, tmp_path, "--tls-secret", "orders-mongoproxy-tls", "--tls-upstream-ca")
    assert code == 0
    for key in (inject.ANN_TLS_SECRET, inject.ANN_TLS_UPSTREAM_CA):
        del result["metadata"]["annotations"][key]
    assert result == by_flags
    secret, flags = _tls_facts(result)
    assert secret == "orders-mongoproxy-tls" and "--upstream-tls" in flags
    # tls-upstream-ca without a Secret: allowed, not injected, the warning names the annotation.
    lone = copy.deepcopy(pod)
    lone["metadata"].setdefault("annotations", {})[inject.ANN_TLS_UPSTREAM_CA] = "true"
    resp = webhook.review(admission_review(lone))["response"]
    assert resp["allowed"] is True and "patch" not in resp
    assert any(inject.ANN_TLS_UPSTREAM_CA in w for w in resp["warnings"])


def test_tls_from_configmap_equals_inject_tls_flags(certs, tmp_path):
    """tls_secret in the ConfigMap gives every pod the Secret, as `inject --tls-secret` does; an empty
    mongoproxy.io/tls-secret annotation turns it off for one pod."""
    config = tmp_path / "inject.toml"
    config.write_text(CONFIGMAP_DEFAULTS.read_text() + 'tls_secret = "shop-mongoproxy-tls"\n')
    hook = WebhookProcess(certs, config=config).start()
    try:
        pod = app_pod()
        result = patched(pod, hook.review(admission_review(pod)))
        code, expected, _ = inject_pod_file(pod, tmp_path, "--tls-secret", "shop-mongoproxy-tls")
        assert code == 0 and result == expected
        assert _tls_facts(result)[0] == "shop-mongoproxy-tls"
        off = copy.deepcopy(pod)
        off["metadata"].setdefault("annotations", {})[inject.ANN_TLS_SECRET] = ""
        result = patched(off, hook.review(admission_review(off)))
        code, expected, _ = inject_pod_file(off, tmp_path)
        assert code == 0 and result == expected
        assert not any(v["name"] == inject.TLS_VOLUME for v in result["spec"]["volumes"])
    finally:
        assert hook.stop() == 0, hook.stderr_text()


def test_legacy_sidecar_for_old_clusters(certs, tmp_path):
    """--kubernetes-version 1.28 gives what `inject --legacy-sidecar` gives (a Job's pod gets its note)."""
    hook = WebhookProcess(certs, "--kubernetes-version", "1.28", config=CONFIGMAP_DEFAULTS).start()
    try:
        for name in ("app.yaml", "job.in.yaml"):
            (obj,) = [w[3] for w in workloads() if w[1].name == name]
            pod = pod_of(obj)
            response = hook.review(admission_review(pod))
            code, expected, _ = inject_pod_file(pod, tmp_path, "--legacy-sidecar")
            assert code == 0 and patched(pod, response) == expected
            assert any(c["name"] == inject.SIDECAR_NAME for c in expected["spec"]["containers"])
            warnings = response["response"].get("warnings", [])
            assert any("never completes" in w for w in warnings) == (obj["kind"] == "Job")
    finally:
        assert hook.stop() == 0


# ---- opt-out, errors: always allowed, never a patch, a warning and a count ----


def _errors(webhook, reason: str) -> float:
    return webhook.metric("mongoproxy_webhook_errors_total", reason=reason)


def test_opted_out_pod(webhook):
    pod = app_pod()
    pod["metadata"].setdefault("annotations", {})[inject.ANN_INJECT] = "false"
    before = webhook.metric("mongoproxy_webhook_requests_total", outcome="opted_out")
    resp = webhook.review(admission_review(pod))["response"]
    assert resp == {"uid": resp["uid"], "allowed": True}
    assert webhook.metric("mongoproxy_webhook_requests_total", outcome="opted_out") == before + 1


@pytest.mark.parametrize(
    "body,needle",
    [
        (b"{not json", "not JSON"),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}', "no request"),
        (b'{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "x"}}', "v1"),
        (
            b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "u-1", '
            b'"kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE", "object": [1]}}',
            "not a Pod",
        ),
    ],
)
def test_unparseable_request_is_allowed_with_a_warning(webhook, body, needle):
    before = _errors(webhook, "bad_request")
    response = webhook.review(body)
    resp = response["response"]
    assert response["kind"] == "AdmissionReview" and resp["allowed"] is True and "patch" not in resp
    (warning,) = resp["warnings"]
    assert needle in warning
    # The uid is echoed whenever the request has one, so that the API server can match the answer.
    assert resp["uid"] == ("u-1" if b"u-1" in body else "x" if b'"x"' in body else "")
    assert _errors(webhook, "bad_request") == before + 1


@pytest.mark.parametrize(
    "annotation,value",
    [
        (inject.ANN_PROXY_PORT, "http"),
        (inject.ANN_CPU_LIMIT, "lots"),
        (inject.ANN_METRIC_LABELS, "op,colour"),
        (inject.ANN_LOG_COMMANDS, "sometimes"),
        (inject.ANN_INJECT, "maybe"),
    ],
)
def test_bad_annotation_is_allowed_with_a_warning_naming_it(webhook, annotation, value):
    pod = app_pod()
    pod["metadata"].setdefault("annotations", {})[annotation] = value
    before = _errors(webhook, "bad_annotation")
    resp = webhook.review(admission_review(pod))["response"]
    assert resp["allowed"] is True and "patch" not in resp
    (warning,) = resp["warnings"]
    assert annotation in warning and repr(value) in warning
    assert _errors(webhook, "bad_annotation") == before + 1


def test_other_operations_pass_untouched(webhook):
    pod = app_pod()
    resp = webhook.review(admission_review(pod, operation="UPDATE"))["response"]
    assert set(resp) == {"uid", "allowed"} and resp["allowed"] is True


def test_health_and_metrics(webhook):
    assert webhook.request("GET", "/healthz") == (200, b"ok\n")
    assert webhook.request("GET", "/readyz") == (200, b"ready\n")
    # Every reason and outcome exists from the first scrape.
    for reason in ("bad_request", "bad_annotation", "not_injectable", "internal", "cert_reload", "config_reload"):
        assert _errors(webhook, reason) is not None
    assert webhook.metric("mongoproxy_webhook_requests_total", outcome="injected") >= 0
    assert webhook.request("GET", "/mutate")[0] == 405


# ---- reloading: the defaults file and the certificate ----


def test_defaults_reload_and_a_broken_file_keeps_the_old(certs, tmp_path):
    config = tmp_path / "inject.toml"
    config.write_text(CONFIGMAP_DEFAULTS.read_text())
    hook = WebhookProcess(certs, "--reload-seconds", "0.05", config=config).start()
    pod = app_pod()

    def image() -> str:
        result = patched(pod, hook.review(admission_review(pod)))
        return next(c["image"] for c in result["spec"]["initContainers"] if c["name"] == inject.SIDECAR_NAME)

    try:
        assert image() == inject.DEFAULT_IMAGE
        # Replaced atomically, as the kubelet updates a mounted ConfigMap: a plain write_text() truncates first,
        # and a poll that lands in between reads an empty file, which is valid TOML (the built-in defaults).
        _replace(config, config.read_text().replace(inject.DEFAULT_IMAGE, "registry.example/mongoproxy:2.0"))
        _wait(lambda: image() == "registry.example/mongoproxy:2.0", "the new image")
        _replace(config, 'image = "has spaces in it"\n')
        _wait(lambda: _errors(hook, "config_reload") == 1, "the reload error to be counted")
        assert image() == "registry.example/mongoproxy:2.0"
        assert "injection defaults: not reloaded" in hook.stderr_text()
    finally:
        assert hook.stop() == 0


def _replace(path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def _wait(check, what: str, attempts: int = 400) -> None:
    for _ in range(attempts):
        if check():
            return
        time.sleep(0.025)
    raise AssertionError(f"gave up waiting for {what}")


def _served_serial(hook: WebhookProcess) -> int:
    from cryptography import x509

    conn = hook.connection()
    try:
        conn.connect()
        der = conn.sock.getpeercert(binary_form=True)
    finally:
        conn.close()
    return x509.load_der_x509_certificate(der).serial_number


def test_certificate_rotation_while_requests_flow(tmp_path):
    certs = Certs(tmp_path)
    hook = WebhookProcess(certs, "--reload-seconds", "0.05", config=CONFIGMAP_DEFAULTS).start()
    pod = app_pod()
    review = admission_review(pod)
    stop = threading.Event()
    answers: list[object] = []

    def flow() -> None:
        # New connections each time, each verified against the CA: every one must succeed across rotations.
        while not stop.is_set() and len(answers) < 5000:
            try:
                answers.append(hook.review(review)["response"]["allowed"])
            except Exception as exc:  # noqa: BLE001 - recorded, asserted below
                answers.append(exc)

    threads = [threading.Thread(target=flow) for _ in range(2)]
    try:
        first = _served_serial(hook)
        assert first == certs.serial
        for t in threads:
            t.start()
        for _ in range(3):
            count = len(answers)
            serial = certs.rotate()
            _wait(lambda s=serial: _served_serial(hook) == s, "the rotated certificate")
            _wait(lambda c=count: len(answers) > c + 5, "requests after the rotation")
        stop.set()
        for t in threads:
            t.join(30)
        failures = [a for a in answers if a is not True]
        assert answers and not failures, failures[:3]
        assert _errors(hook, "cert_reload") == 0
        assert hook.stderr_text().count("certificate reloaded") >= 3
    finally:
        stop.set()
        assert hook.stop() == 0


def test_missing_certificate_is_one_line(tmp_path, capsys):
    code = cli.main(["webhook", "--tls-cert", str(tmp_path / "nope.crt"), "--tls-key", str(tmp_path / "nope.key")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cannot load --tls-cert" in err and "nope.crt" in err


def test_sighup_reloads_without_polling(certs, tmp_path):
    """--reload-seconds 0 turns the poll off; SIGHUP (the shared reload contract) still rereads the defaults."""
    import signal

    config = tmp_path / "inject.toml"
    config.write_text('image = "registry.example/mongoproxy:1.0"\n')
    hook = WebhookProcess(certs, "--reload-seconds", "0", config=config).start()
    pod = app_pod()

    def image() -> str:
        result = patched(pod, hook.review(admission_review(pod)))
        return next(c["image"] for c in result["spec"]["initContainers"] if c["name"] == inject.SIDECAR_NAME)

    try:
        assert image() == "registry.example/mongoproxy:1.0"
        config.write_text('image = "registry.example/mongoproxy:1.1"\n')
        assert image() == "registry.example/mongoproxy:1.0"  # no poll: unchanged until told
        hook.proc.send_signal(signal.SIGHUP)
        _wait(lambda: image() == "registry.example/mongoproxy:1.1", "the reload on SIGHUP")
    finally:
        assert hook.stop() == 0
