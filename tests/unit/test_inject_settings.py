"""inject's settings by name (the webhook's ConfigMap) and the per-pod overrides added with the webhook."""

from __future__ import annotations

import tomllib

import pytest

from mongoproxy import cli, inject
from mongoproxy.errors import ConfigError


def test_settings_from_toml_equal_the_same_flags():
    text = """
    image = "registry.example/mongoproxy:1.2"
    mongo_ports = "27017-27019"
    proxy_port = 15017
    admin_port = 15020
    proxy_uid = 4242
    ipv6 = true
    cpu_limit = "2"
    memory_request = "100Mi"
    metric_labels = "db, OP"
    log_commands = true
    proxy_args = ["--slow-ms 100", "--max-label-values 50"]
    """
    from_file = inject.options_from_settings(tomllib.loads(text), "inject.toml")
    flags = cli.build_parser().parse_args(
        [
            "inject",
            "--image=registry.example/mongoproxy:1.2",
            "--mongo-ports=27017-27019",
            "--proxy-port=15017",
            "--admin-port=15020",
            "--proxy-uid=4242",
            "--ipv6",
            "--cpu-limit=2",
            "--memory-request=100Mi",
            "--metric-labels=db, OP",
            "--log-commands",
            "--proxy-args=--slow-ms 100",
            "--proxy-args=--max-label-values 50",
        ]
    )
    assert from_file == inject.options_from_args(flags)
    assert from_file.metric_labels == "op,db"  # the metrics sink's canonical order
    container = inject.sidecar_container(from_file)
    assert container["resources"] == {
        "requests": {"cpu": "50m", "memory": "100Mi"},
        "limits": {"cpu": "2", "memory": "256Mi"},
    }
    run = cli.build_parser().parse_args(container["args"])
    assert (run.metric_labels, run.log_commands, run.slow_ms, run.max_label_values) == ("op,db", True, "100", "50")


@pytest.mark.parametrize(
    "settings,needle",
    [
        ({"colour": "blue"}, "unknown injection setting(s) colour"),
        ({"cpu_limit": "lots"}, "--cpu-limit 'lots' is not a Kubernetes quantity"),
        ({"image_pull_policy": "Sometimes"}, "use one of Always, IfNotPresent, Never"),
        ({"log_commands": "perhaps"}, "--log-commands 'perhaps' is not valid"),
        ({"metric_labels": "op,colour"}, "--metric-labels 'op,colour': unknown label 'colour'"),
        ({"proxy_port": 9898}, "give them different ports"),
    ],
)
def test_bad_settings_are_one_line_naming_the_file(settings, needle):
    with pytest.raises(ConfigError) as info:
        inject.options_from_settings(settings, "inject.toml")
    message = str(info.value)
    assert needle in message and message.startswith("inject.toml: ") and "\n" not in message


@pytest.mark.parametrize("quantity", ["1", "0.5", "500m", "128Mi", "1Gi", "2k", ".5"])
def test_quantities(quantity):
    assert inject.parse_quantity(quantity, "x") == quantity


BAD = {inject.ANN_PROXY_ARGS: "--no-such-flag"}


@pytest.mark.parametrize("annotation,value", [(a, BAD.get(a, "!bad value!")) for a in inject.ANNOTATION_OVERRIDES])
def test_every_override_names_its_annotation(annotation, value):
    with pytest.raises(inject.AnnotationError) as info:
        inject.inject_pod(
            {"annotations": {annotation: value}},
            {"containers": [{"name": "a"}]},
            inject.InjectOptions(),
            "Pod/p",
            "Pod",
            inject.Report(),
        )
    assert info.value.annotation == annotation and annotation in str(info.value)


def test_overrides_reach_the_containers():
    meta = {
        "annotations": {
            inject.ANN_IMAGE: "r/m:2",
            inject.ANN_CPU_REQUEST: "10m",
            inject.ANN_MEMORY_LIMIT: "1Gi",
            inject.ANN_LOG_COMMANDS: "yes",
        }
    }
    spec = {"containers": [{"name": "app"}]}
    assert inject.inject_pod(meta, spec, inject.InjectOptions(), "Pod/p", "Pod", inject.Report())
    init, sidecar = spec["initContainers"]
    assert init["image"] == sidecar["image"] == "r/m:2"
    assert sidecar["resources"] == {
        "requests": {"cpu": "10m", "memory": "64Mi"},
        "limits": {"cpu": "1", "memory": "1Gi"},
    }
    assert sidecar["args"][-1] == "--log-commands"
