"""`mongoproxy inject`: golden outputs for every kind, idempotence, and validation with the kubernetes client's models.

Regenerate the golden files after an intended change with MONGOPROXY_UPDATE_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import inspect
import io
import json
import os
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from mongoproxy import cli, inject
from mongoproxy.errors import ConfigError
from mongoproxy.shutdown import SHUTDOWN_MARGIN_SECONDS, grace_seconds

GOLDEN = Path(__file__).resolve().parent / "golden" / "inject"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UPDATE = os.environ.get("MONGOPROXY_UPDATE_GOLDEN") == "1"

CUSTOM = [
    "--ipv6",
    "--image",
    "registry.example/platform/mongoproxy:0.1.0",
    "--mongo-ports",
    "27017-27019",
    "--proxy-port",
    "15017",
    "--admin-port",
    "15020",
    "--proxy-uid",
    "4242",
    "--iptables-backend",
    "legacy",
    "--proxy-args=--metric-labels op,db,collection,app --max-label-values 200",
]

# case -> (input file, extra flags)
CASES = {
    "deployment": ("deployment", []),
    "deployment-legacy": ("deployment", ["--legacy-sidecar"]),
    "deployment-custom": ("deployment", CUSTOM),
    "deployment-tls": ("deployment", ["--tls-secret", "orders-mongoproxy-tls", "--tls-upstream-ca"]),
    "statefulset": ("statefulset", []),
    "daemonset": ("daemonset", []),
    "replicaset": ("replicaset", []),
    "job": ("job", []),
    "cronjob": ("cronjob", []),
    "pod": ("pod", []),
    "multi": ("multi", []),
    "list": ("list", []),
}

MODELS = {
    "Deployment": "V1Deployment",
    "StatefulSet": "V1StatefulSet",
    "DaemonSet": "V1DaemonSet",
    "ReplicaSet": "V1ReplicaSet",
    "Job": "V1Job",
    "CronJob": "V1CronJob",
    "Pod": "V1Pod",
    "Service": "V1Service",
    "ConfigMap": "V1ConfigMap",
    "PodDisruptionBudget": "V1PodDisruptionBudget",
}


@pytest.fixture(autouse=True)
def _commands(monkeypatch):
    """The sub-commands are registered, whatever cli.COMMAND_MODULES holds."""
    mods = tuple(dict.fromkeys(cli.COMMAND_MODULES + ("mongoproxy.iptables", "mongoproxy.inject")))
    monkeypatch.setattr(cli, "COMMAND_MODULES", mods)


def run_inject(capsys, *argv: str, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = cli.main(["inject", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def plain(obj):
    """ruamel's round-trip types as plain JSON values."""
    return json.loads(json.dumps(obj))


def load_all(text: str) -> list:
    return [plain(d) for d in YAML(typ="safe").load_all(text) if d is not None]


# ---- kubernetes client models ----


def deserialize(doc: dict, model: str):
    """`doc` as the official client's model `model` (works before and after its pydantic rewrite)."""
    from kubernetes.client import ApiClient

    api = ApiClient()
    text = json.dumps(doc)
    if "content_type" in inspect.signature(api.deserialize).parameters:
        return api.deserialize(text, model, "application/json")

    class Response:  # the older client reads response.data
        data = text

    return api.deserialize(Response(), model)


def drop_nulls(value):
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def check_with_models(doc: dict) -> list:
    """Deserialize `doc` (List items one by one) and check nothing was dropped or retyped; returns the models."""
    from kubernetes.client import ApiClient

    if doc["kind"] == "List":
        return [m for item in doc["items"] for m in check_with_models(item)]
    model = deserialize(doc, MODELS[doc["kind"]])
    # A field the model does not know, or a value of the wrong type, would not survive the round trip.
    assert ApiClient().sanitize_for_serialization(model) == drop_nulls(doc)
    return [model]


def pod_spec_of(model):
    kind = model.kind
    if kind == "Pod":
        return model.metadata, model.spec
    if kind == "CronJob":
        t = model.spec.job_template.spec.template
    else:
        t = model.spec.template
    return t.metadata, t.spec


def check_injected_pod(
    meta,
    spec,
    *,
    legacy: bool,
    admin_port: int = 9898,
    proxy_port: int = 27111,
    proxy_uid: int = 9999,
    mongo_ports: str = "27017",
    ipv6: bool = False,
    backend: str = "auto",
    tls_secret: str | None = None,
) -> None:
    """Every field of the two containers, with the model's types."""
    inits = spec.init_containers or []
    containers = spec.containers
    init = next(c for c in inits if c.name == inject.INIT_NAME)
    if legacy:
        sidecar = next(c for c in containers if c.name == inject.SIDECAR_NAME)
        assert inits[-1].name == inject.INIT_NAME  # after the app's own init containers
        assert containers[-1].name == inject.SIDECAR_NAME
        assert sidecar.restart_policy is None
        assert meta.annotations[inject.ANN_DEFAULT_CONTAINER] == containers[0].name
    else:
        assert [c.name for c in inits[:2]] == [inject.INIT_NAME, inject.SIDECAR_NAME]
        sidecar = inits[1]
        assert sidecar.restart_policy == "Always"
        assert all(c.name != inject.SIDECAR_NAME for c in containers)

    # init container: root, only NET_ADMIN and NET_RAW, read-only root with /run on an emptyDir
    sc = init.security_context
    assert (sc.run_as_user, sc.run_as_non_root, sc.privileged, sc.allow_privilege_escalation) == (
        0,
        False,
        False,
        False,
    )
    assert sc.read_only_root_filesystem is True
    assert sc.capabilities.drop == ["ALL"] and sc.capabilities.add == ["NET_ADMIN", "NET_RAW"]
    assert init.args == [
        "init-iptables",
        "--proxy-port",
        str(proxy_port),
        "--mongo-ports",
        mongo_ports,
        "--proxy-uid",
        str(proxy_uid),
    ] + (["--ipv6"] if ipv6 else []) + (["--backend", backend] if backend != "auto" else [])
    assert [(m.name, m.mount_path) for m in init.volume_mounts] == [(inject.XTABLES_VOLUME, "/run")]
    vol = next(v for v in spec.volumes if v.name == inject.XTABLES_VOLUME)
    assert vol.empty_dir.medium == "Memory"
    assert init.image == sidecar.image

    # the proxy
    sc = sidecar.security_context
    assert isinstance(sc.run_as_user, int) and sc.run_as_user == proxy_uid and sc.run_as_group == proxy_uid
    assert sc.run_as_non_root is True and sc.read_only_root_filesystem is True
    assert sc.allow_privilege_escalation is False and sc.capabilities.drop == ["ALL"] and not sc.capabilities.add
    args = sidecar.args
    assert args[:3] == ["run", "--proxy", str(proxy_port)]
    flag = {args[i]: args[i + 1] for i in range(1, len(args) - 1) if args[i].startswith("--")}
    assert flag["--admin-host"] == ("0.0.0.0,::" if ipv6 else "0.0.0.0")
    assert flag["--admin-port"] == str(admin_port)
    assert flag["--listen-host"] == ("127.0.0.1,::1" if ipv6 else "127.0.0.1")
    drain = int(flag["--drain-seconds"])
    grace = spec.termination_grace_period_seconds or 30
    prestop = 0
    if sidecar.lifecycle is not None:
        assert legacy, "a native sidecar is stopped after the app and needs no preStop pause"
        cmd = (
            sidecar.lifecycle.pre_stop._exec.command
            if hasattr(sidecar.lifecycle.pre_stop, "_exec")
            else sidecar.lifecycle.pre_stop.exec.command
        )
        assert cmd[0] == "sleep"
        prestop = int(cmd[1])
    else:
        assert not legacy
    # The grace period holds the preStop pause, the drain and the shutdown margin (closing the sinks).
    assert 0 < drain and prestop + drain + SHUTDOWN_MARGIN_SECONDS < grace
    for probe, path in (
        (sidecar.liveness_probe, "/healthz"),
        (sidecar.readiness_probe, "/readyz"),
        (sidecar.startup_probe, "/readyz"),
    ):
        assert probe.http_get.path == path
        assert probe.http_get.port == admin_port
    assert [(p.name, p.container_port, p.protocol) for p in sidecar.ports] == [
        (inject.ADMIN_PORT_NAME, admin_port, "TCP")
    ]
    res = sidecar.resources
    assert set(res.requests) == {"cpu", "memory"} and set(res.limits) == {"cpu", "memory"}
    assert all(isinstance(v, str) for v in {**res.requests, **res.limits}.values())
    status = json.loads(meta.annotations[inject.ANN_STATUS])
    assert status["volumes"] == [inject.XTABLES_VOLUME] + ([inject.TLS_VOLUME] if tls_secret else [])
    if tls_secret:
        vol = next(v for v in spec.volumes if v.name == inject.TLS_VOLUME)
        assert vol.secret.secret_name == tls_secret
    assert meta.labels[inject.LABEL_SIDECAR] == "true"  # what deploy/monitoring/podmonitor.yaml selects


# ---- golden files ----


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case, capsys):
    source, flags = CASES[case]
    src = GOLDEN / f"{source}.in.yaml"
    expected_path = GOLDEN / f"{case}.out.yaml"
    code, out, err = run_inject(capsys, str(src), *flags)
    assert code == 0, err
    if UPDATE:
        expected_path.write_text(out)
    assert expected_path.exists(), f"missing {expected_path}: run with MONGOPROXY_UPDATE_GOLDEN=1 and review it"
    assert out == expected_path.read_text()

    # Idempotent: injecting the output again changes nothing.
    code, again, _ = run_inject(capsys, str(expected_path), *flags)
    assert code == 0 and again == out

    # Everything the kubernetes models can hold, with the right fields and types.
    docs_in, docs_out = load_all(src.read_text()), load_all(out)
    assert [d["kind"] for d in docs_in] == [d["kind"] for d in docs_out]
    legacy = "--legacy-sidecar" in flags
    custom = flags == CUSTOM
    for doc_in, doc_out in zip(docs_in, docs_out):
        models = check_with_models(doc_out)
        items_in = doc_in["items"] if doc_in["kind"] == "List" else [doc_in]
        for model, item_in in zip(models, items_in):
            kind = model.kind
            opted_out = (item_in.get("metadata", {}).get("annotations") or {}).get(inject.ANN_INJECT) == "false"
            if kind not in inject.POD_TEMPLATE_PATHS or opted_out:
                assert plain(deserialize(item_in, MODELS[kind]).to_dict()) == plain(model.to_dict())
                continue
            meta, spec = pod_spec_of(model)
            ann = {**(item_in.get("metadata", {}).get("annotations") or {}), **(meta.annotations or {})}
            kwargs = {}
            if custom:
                kwargs = dict(
                    admin_port=15020,
                    proxy_port=15017,
                    proxy_uid=4242,
                    mongo_ports="27017-27019",
                    ipv6=True,
                    backend="legacy",
                )
            if "--tls-secret" in flags:
                kwargs["tls_secret"] = flags[flags.index("--tls-secret") + 1]
            if inject.ANN_ADMIN_PORT in ann:
                kwargs["admin_port"] = int(ann[inject.ANN_ADMIN_PORT])
            if inject.ANN_MONGO_PORTS in ann:
                kwargs["mongo_ports"] = ann[inject.ANN_MONGO_PORTS]
            check_injected_pod(meta, spec, legacy=legacy, **kwargs)


def test_golden_files_have_no_strays():
    """Every golden output belongs to a case, so a renamed case cannot leave a stale file behind."""
    outs = {p.name[: -len(".out.yaml")] for p in GOLDEN.glob("*.out.yaml")}
    ins = {p.name[: -len(".in.yaml")] for p in GOLDEN.glob("*.in.yaml")}
    assert outs == set(CASES)
    assert ins == {src for src, _ in CASES.values()}


# ---- what is kept ----


def test_comments_and_field_order_are_kept(capsys):
    code, out, _ = run_inject(capsys, str(GOLDEN / "deployment.in.yaml"))
    assert code == 0
    for comment in (
        "# Orders service: talks to the orders replica set on 27017.",
        "# scaled by the HPA",
        "# the app itself",
    ):
        assert comment in out
    doc = load_all(out)[0]
    assert list(doc) == ["apiVersion", "kind", "metadata", "spec"]
    assert list(doc["spec"]) == ["replicas", "selector", "template"]
    # kubectl-style sequences ("- " at the parent's indentation) stay that way
    assert "\n      containers:\n      # the app itself\n      - name: orders\n" in out
    assert "resources: {requests: {cpu: 200m, memory: 256Mi}}" in out


def test_helm_style_indentation_is_kept(capsys):
    code, out, _ = run_inject(capsys, str(GOLDEN / "statefulset.in.yaml"))
    assert code == 0
    assert "\n      initContainers:\n        - name: mongoproxy-init\n" in out
    assert "# a second mongos on 27018" in out


def test_opted_out_and_other_kinds_pass_through_byte_for_byte(capsys):
    code, out, err = run_inject(capsys, str(GOLDEN / "multi.in.yaml"))
    assert code == 0
    src_docs = (GOLDEN / "multi.in.yaml").read_text().split("---\n")[1:]
    out_docs = out.split("---\n")[1:]
    assert len(out_docs) == 4
    for i in (0, 2, 3):  # Service, opted-out Deployment, ConfigMap
        assert out_docs[i] == src_docs[i]
    assert "note: Service/api has no pod template: passed through unchanged" in err
    assert "note: ConfigMap/api-config has no pod template" in err
    assert 'note: Deployment/batch-loader: skipped (mongoproxy.io/inject: "false")' in err


def test_stdin_dash_and_several_files(capsys, monkeypatch):
    text = (GOLDEN / "pod.in.yaml").read_text()
    code, from_stdin, _ = run_inject(capsys, "-", stdin=text, monkeypatch=monkeypatch)
    assert code == 0
    code, from_file, _ = run_inject(capsys, "-f", str(GOLDEN / "pod.in.yaml"))
    assert code == 0 and from_stdin == from_file
    code, both, _ = run_inject(capsys, str(GOLDEN / "pod.in.yaml"), "-f", str(GOLDEN / "cronjob.in.yaml"))
    assert code == 0
    assert [d["kind"] for d in load_all(both)] == ["Pod", "CronJob"]


def test_rerun_with_other_flags_replaces_in_place(capsys, tmp_path):
    """Upgrading the image or switching to a legacy sidecar rewrites what inject added, nothing else."""
    first = tmp_path / "first.yaml"
    code, out, _ = run_inject(capsys, str(GOLDEN / "deployment.in.yaml"), "--legacy-sidecar")
    first.write_text(out)
    code, out, _ = run_inject(capsys, str(first), "--image", "mongoproxy:0.2.0")
    assert code == 0
    code, fresh, _ = run_inject(capsys, str(GOLDEN / "deployment.in.yaml"), "--image", "mongoproxy:0.2.0")
    assert out == fresh
    assert "mongoproxy:0.1.0" not in out


def test_grace_period_is_raised_to_fit_the_drain_and_restored_on_rerun(capsys, tmp_path):
    """A drain that does not fit terminationGracePeriodSeconds raises it (with a note); a rerun starts over."""
    src = tmp_path / "in.yaml"
    text = (GOLDEN / "deployment.in.yaml").read_text()
    src.write_text(
        text.replace(
            "    metadata:\n      labels:\n",
            "    metadata:\n      annotations:\n        mongoproxy.io/drain-seconds: '40'\n      labels:\n",
            1,
        )
    )
    code, out, err = run_inject(capsys, str(src))
    assert code == 0, err
    spec = load_all(out)[0]["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == grace_seconds(40) == 47
    assert "raised from 30 to 47" in err
    first = tmp_path / "first.yaml"
    first.write_text(out)
    code, again, _ = run_inject(capsys, str(first))
    assert again == out  # the recorded original (unset) is restored first, so a rerun does not stack


def test_legacy_job_gets_a_note(capsys):
    code, out, err = run_inject(capsys, str(GOLDEN / "job.in.yaml"), "--legacy-sidecar")
    assert code == 0
    assert "never completes" in err


def test_existing_scrape_annotations_are_not_overwritten(capsys):
    code, out, err = run_inject(capsys, str(GOLDEN / "replicaset.in.yaml"))
    assert code == 0
    ann = load_all(out)[0]["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/port"] == "8000"
    assert "podmonitor" in err


def test_host_network_pods_are_skipped(capsys, tmp_path):
    src = tmp_path / "hostnet.yaml"
    text = (GOLDEN / "pod.in.yaml").read_text().replace("spec:\n", "spec:\n  hostNetwork: true\n", 1)
    src.write_text(text)
    code, out, err = run_inject(capsys, str(src))
    assert code == 0 and out == text
    assert "hostNetwork" in err


def test_sidecar_args_are_accepted_by_run():
    """The proxy's arguments parse with the real `mongoproxy run` parser."""
    opts = inject.InjectOptions(proxy_args=("--log-commands", "--slow-ms", "5"))
    args = cli.build_parser().parse_args(inject.sidecar_container(opts)["args"])
    assert args.command == "run" and args.admin_host == "0.0.0.0" and args.slow_ms == "5"
    init = cli.build_parser().parse_args(inject.init_container(opts)["args"])
    assert init.command == "init-iptables" and init.proxy_uid == 9999


def test_tls_secret_mounts_the_secret_and_sets_the_flags(capsys, tmp_path):
    code, out, _ = run_inject(capsys, str(GOLDEN / "deployment.in.yaml"), "--tls-secret", "db-tls")
    assert code == 0
    spec = load_all(out)[0]["spec"]["template"]["spec"]
    sidecar = next(c for c in spec["initContainers"] if c["name"] == "mongoproxy")
    (mount,) = sidecar["volumeMounts"]
    assert {"name": "mongoproxy-tls", "secret": {"secretName": "db-tls"}} in spec["volumes"]
    args = cli.build_parser().parse_args(sidecar["args"])
    assert args.tls_cert == [f"{mount['mountPath']}/tls.crt"] and args.tls_key == [f"{mount['mountPath']}/tls.key"]
    assert args.tls_listen == "allow" and args.upstream_tls is None and mount["readOnly"] is True
    # Injecting again without --tls-secret removes the volume and the mount.
    first = tmp_path / "tls.yaml"
    first.write_text(out)
    code, again, _ = run_inject(capsys, str(first))
    code, fresh, _ = run_inject(capsys, str(GOLDEN / "deployment.in.yaml"))
    assert again == fresh and "mongoproxy-tls" not in again


def test_tls_upstream_ca_needs_the_secret(capsys, tmp_path):
    assert "give --tls-secret NAME" in _bad(capsys, tmp_path, (GOLDEN / "pod.in.yaml").read_text(), "--tls-upstream-ca")
    assert "is not a Secret name" in _bad(capsys, tmp_path, (GOLDEN / "pod.in.yaml").read_text(), "--tls-secret", "A_b")


@pytest.mark.parametrize("grace,legacy", [(0, False), (1, True), (5, True), (10, False), (30, True), (300, True)])
def test_drain_fits_the_grace_period(grace, legacy):
    drain, prestop = inject.drain_timing(grace, legacy, None)
    assert drain + prestop <= max(grace - 1, 0) or grace == 0
    assert drain <= inject.MAX_DRAIN_SECONDS and prestop <= inject.MAX_PRESTOP_SECONDS
    assert (prestop > 0) == (legacy and grace >= 3)


# ---- bad input: one line naming the fix, exit 2, nothing on stdout ----


def _bad(capsys, tmp_path, text: str, *flags: str) -> str:
    src = tmp_path / "in.yaml"
    src.write_text(text)
    code, out, err = run_inject(capsys, str(src), *flags)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_invalid_yaml(capsys, tmp_path):
    line = _bad(capsys, tmp_path, "apiVersion: v1\nkind: Pod\nmetadata:\n  name: [x\nspec: {}\n")
    assert "not valid YAML at line" in line and "in.yaml" in line and "fix the document" in line


def test_invalid_yaml_in_a_later_document_writes_nothing(capsys, tmp_path):
    text = (GOLDEN / "pod.in.yaml").read_text() + "---\nkind: Pod\n  bad: indent\n"
    line = _bad(capsys, tmp_path, text)
    assert "line 17" in line


def test_conflicting_container_name(capsys, tmp_path):
    text = (GOLDEN / "pod.in.yaml").read_text().replace("name: shell", "name: mongoproxy")
    line = _bad(capsys, tmp_path, text)
    assert "already has a container named 'mongoproxy'" in line and "rename" in line


@pytest.mark.parametrize("port,flag", [("27111", "--proxy-port"), ("9898", "--admin-port")])
def test_port_clash_with_app(capsys, tmp_path, port, flag):
    text = (GOLDEN / "pod.in.yaml").read_text() + f"    ports:\n    - containerPort: {port}\n"
    line = _bad(capsys, tmp_path, text)
    assert f"already uses port {port}" in line and flag in line


def test_app_running_as_proxy_uid(capsys, tmp_path):
    text = (GOLDEN / "pod.in.yaml").read_text().replace("runAsUser: 1000", "runAsUser: 9999")
    line = _bad(capsys, tmp_path, text)
    assert "the proxy's uid" in line and "--proxy-uid" in line


@pytest.mark.parametrize(
    "flags,needle",
    [
        (("--proxy-port", "27017"), "choose another --proxy-port"),
        (("--admin-port", "27111"), "different ports"),
        (("--mongo-ports", "27017,x"), "not a port or a range"),
        (("--proxy-uid", "0"), "non-root uid"),
        (("--proxy-args=--admin-port 1"), "set by mongoproxy inject"),
        (("--proxy-args=--no-such-flag"), "not a flag of 'mongoproxy run'"),
        (("--proxy-args=--log-file 'unterminated"), "quote it"),
        (("--image", "bad image"), "not an image reference"),
    ],
)
def test_bad_flags(capsys, tmp_path, flags, needle):
    flags = (flags,) if isinstance(flags, str) else flags
    line = _bad(capsys, tmp_path, (GOLDEN / "pod.in.yaml").read_text(), *flags)
    assert needle in line


@pytest.mark.parametrize(
    "annotation,needle",
    [
        ('mongoproxy.io/inject: "maybe"', 'use "true" or "false"'),
        ('mongoproxy.io/proxy-port: "http"', "is not a port"),
        ('mongoproxy.io/mongo-ports: "27111"', "choose another --proxy-port"),
        ('mongoproxy.io/drain-seconds: "soon"', "whole number"),
        ('mongoproxy.io/proxy-args: "--proxy 1"', "use --proxy-port instead"),
    ],
)
def test_bad_annotations(capsys, tmp_path, annotation, needle):
    text = (GOLDEN / "pod.in.yaml").read_text().replace("  labels:\n", f"  annotations:\n    {annotation}\n  labels:\n")
    line = _bad(capsys, tmp_path, text)
    assert needle in line and "Pod/debug-shell" in line


def test_missing_file(capsys):
    code, out, err = run_inject(capsys, "/nonexistent/deploy.yaml")
    assert code == 2 and out == "" and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_non_object_document_passes_through(capsys, tmp_path):
    src = tmp_path / "x.yaml"
    src.write_text("just: a map\n")
    code, out, err = run_inject(capsys, str(src))
    assert code == 0 and out == "just: a map\n" and "not a Kubernetes object" in err


def test_options_checked_before_reading():
    with pytest.raises(ConfigError):
        inject.check_proxy_args(["--drain-seconds=3"])


# ---- deploy/ ----


def test_deploy_example_is_injects_output(capsys):
    """deploy/examples/app-injected.yaml is exactly what inject makes of app.yaml."""
    code, out, _ = run_inject(capsys, str(DEPLOY / "examples" / "app.yaml"))
    assert code == 0
    assert out == (DEPLOY / "examples" / "app-injected.yaml").read_text(), (
        "regenerate: mongoproxy inject deploy/examples/app.yaml > deploy/examples/app-injected.yaml"
    )
    for doc in load_all(out):
        for model in check_with_models(doc):
            if model.kind == "Deployment":
                check_injected_pod(*pod_spec_of(model), legacy=False)


def test_front_proxy_example():
    docs = load_all((DEPLOY / "examples" / "front-proxy.yaml").read_text())
    models = [m for d in docs for m in check_with_models(d)]
    deployment = next(m for m in models if m.kind == "Deployment")
    service = next(m for m in models if m.kind == "Service")
    container = deployment.spec.template.spec.containers[0]
    args = cli.build_parser().parse_args(container.args)
    assert args.command == "run"
    assert args.admin_host == "0.0.0.0" and args.admin_port == str(inject.InjectOptions().admin_port)
    ports = {p.name: p.container_port for p in container.ports}
    assert ports[inject.ADMIN_PORT_NAME] == int(args.admin_port)
    assert {p.name for p in service.spec.ports} == set(ports)
    assert service.spec.selector == deployment.spec.template.metadata.labels
    probes = (container.readiness_probe.http_get, container.liveness_probe.http_get)
    assert [(p.path, p.port) for p in probes] == [("/readyz", 9898), ("/healthz", 9898)]
    assert deployment.spec.template.spec.security_context.run_as_non_root is True


def test_monitors_select_what_inject_and_the_front_proxy_make():
    (podmonitor,) = load_all((DEPLOY / "monitoring" / "podmonitor.yaml").read_text())
    assert podmonitor["apiVersion"] == "monitoring.coreos.com/v1" and podmonitor["kind"] == "PodMonitor"
    assert podmonitor["spec"]["selector"]["matchLabels"] == {inject.LABEL_SIDECAR: "true"}
    assert podmonitor["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = podmonitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == inject.ADMIN_PORT_NAME and endpoint["path"] == "/metrics"

    (servicemonitor,) = load_all((DEPLOY / "monitoring" / "servicemonitor.yaml").read_text())
    assert servicemonitor["kind"] == "ServiceMonitor"
    service = next(
        d for d in load_all((DEPLOY / "examples" / "front-proxy.yaml").read_text()) if d["kind"] == "Service"
    )
    assert servicemonitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert servicemonitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    (endpoint,) = servicemonitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
