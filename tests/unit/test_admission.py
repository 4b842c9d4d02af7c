"""admission.py without a server: the JSONPatch diff, and answers that are always allowed."""

from __future__ import annotations

import base64
import json

import jsonpatch
from hypothesis import given, settings
from hypothesis import strategies as st

from mongoproxy import admission, inject

KEYS = st.sampled_from(["a", "b", "x/y", "t~0", "mongoproxy.io/injected", ""])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(JSON, JSON)
def test_json_patch_turns_old_into_new(old, new):
    ops = admission.json_patch(old, new)
    assert jsonpatch.JsonPatch(ops).apply(old) == new
    assert (ops == []) == (json.dumps(old, sort_keys=True) == json.dumps(new, sort_keys=True))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=6), st.data())
def test_insertions_are_adds_not_replaces(old, data):
    new = list(old)
    for _ in range(data.draw(st.integers(1, 3))):
        new.insert(data.draw(st.integers(0, len(new))), {"added": data.draw(st.integers())})
    ops = admission.json_patch({"l": old}, {"l": new})
    assert {op["op"] for op in ops} == {"add"}
    assert jsonpatch.JsonPatch(ops).apply({"l": old}) == {"l": new}


def _review(pod: dict) -> dict:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": "shop",
            "operation": "CREATE",
            "object": pod,
        },
    }


POD = {"metadata": {"generateName": "web-"}, "spec": {"containers": [{"name": "web", "image": "web:1"}]}}


def test_a_pod_without_metadata_gets_it_whole():
    answer = admission.review(json.dumps(_review({"spec": POD["spec"]})), inject.InjectOptions())
    assert answer.outcome == "injected"
    resp = answer.response()["response"]
    ops = json.loads(base64.b64decode(resp["patch"]))
    (meta,) = [op for op in ops if op["path"] == "/metadata"]
    assert meta["op"] == "add" and meta["value"]["annotations"][inject.ANN_STATUS]


def test_host_network_pods_are_skipped_with_the_note():
    pod = json.loads(json.dumps(POD))
    pod["spec"]["hostNetwork"] = True
    answer = admission.review(json.dumps(_review(pod)), inject.InjectOptions())
    assert answer.outcome == "skipped" and not answer.patch and answer.error is None
    assert "hostNetwork" in answer.warnings[0]


def test_a_bug_is_allowed_and_counted_as_internal(monkeypatch):
    def boom(*args, **kwargs):
        raise KeyError("bug")

    monkeypatch.setattr(admission, "inject_pod", boom)
    answer = admission.review(json.dumps(_review(POD)), inject.InjectOptions())
    assert answer.error == "internal" and answer.response()["response"]["allowed"] is True
    assert "KeyError" in answer.warnings[0] and not answer.patch
