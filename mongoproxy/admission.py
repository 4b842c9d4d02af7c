"""AdmissionReview v1 in, AdmissionReview v1 out: the sidecar as a JSONPatch (sans-io; `webhook.py` serves it).

The pod is mutated by `inject.inject_pod`, the function `mongoproxy inject` calls for every pod template,
and the patch is the difference between the pod as sent and the pod as mutated, so the two faces can never
disagree. Invariants:
  - every answer is `allowed: true`: an error means no patch and a warning, never a blocked pod;
  - an already injected pod (annotation mongoproxy.io/injected) gets no patch, so reinvocation is a no-op;
  - only Pod CREATE is mutated; anything else is allowed unchanged.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from mongoproxy.errors import ConfigError
from mongoproxy.inject import ANN_STATUS, JOB_KINDS, AnnotationError, InjectOptions, Report, inject_pod, opted_out

log = logging.getLogger("mongoproxy.webhook")

API_VERSION = "admission.k8s.io/v1"
# Reasons of mongoproxy_webhook_errors_total for a request; each answers allowed with a warning.
REQUEST_ERRORS = ("bad_request", "bad_annotation", "not_injectable", "internal")
# Outcomes of mongoproxy_webhook_requests_total.
OUTCOMES = ("injected", "already_injected", "opted_out", "skipped", "ignored", "error")
MAX_WARNING_CHARS = 256  # the API server may cut longer warnings; cutting here keeps the start, which names the cause


@dataclass
class Review:
    """The answer to one AdmissionReview: always allowed, with a patch or warnings."""

    uid: str = ""
    outcome: str = "ignored"
    patch: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None  # one of REQUEST_ERRORS

    def response(self) -> dict[str, Any]:
        """The AdmissionReview v1 response document."""
        resp: dict[str, Any] = {"uid": self.uid, "allowed": True}
        if self.patch:
            resp["patchType"] = "JSONPatch"
            resp["patch"] = base64.b64encode(json.dumps(self.patch, separators=(",", ":")).encode()).decode()
        if self.warnings:
            resp["warnings"] = [w[:MAX_WARNING_CHARS] for w in self.warnings]
        return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": resp}


def _pointer(path: str, key: Any) -> str:
    return f"{path}/{str(key).replace('~', '~0').replace('/', '~1')}"


def _same(a: Any, b: Any) -> bool:
    # As JSON: Python's True == 1 would hide a change of type.
    return type(a) is type(b) and json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _insertions(old: list, new: list) -> list[int] | None:
    """Indexes in `new` of the items inserted into `old`, or None when `new` is not `old` plus insertions."""
    inserted, j = [], 0
    for i, item in enumerate(new):
        if j < len(old) and _same(old[j], item):
            j += 1
        else:
            inserted.append(i)
    return inserted if j == len(old) else None


def json_patch(old: Any, new: Any, path: str = "") -> list[dict[str, Any]]:
    """RFC 6902 operations that turn `old` into `new`: keys added, removed or replaced; list items inserted."""
    if _same(old, new):
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        ops: list[dict[str, Any]] = [{"op": "remove", "path": _pointer(path, k)} for k in old if k not in new]
        for k, v in new.items():
            if k not in old:
                ops.append({"op": "add", "path": _pointer(path, k), "value": v})
            else:
                ops.extend(json_patch(old[k], v, _pointer(path, k)))
        return ops
    if isinstance(old, list) and isinstance(new, list):
        inserted = _insertions(old, new)
        if inserted is not None:
            # In ascending order each index is final: every item before it is already in place.
            return [{"op": "add", "path": _pointer(path, i), "value": new[i]} for i in inserted]
    return [{"op": "replace", "path": path, "value": new}]


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _fail(review: Review, reason: str, message: str) -> Review:
    review.outcome, review.error = "error", reason
    review.patch = []
    review.warnings = [f"mongoproxy: sidecar not injected: {message}"]
    return review


def review(body: bytes | str, opts: InjectOptions) -> Review:
    """Answer one AdmissionReview request body; never raises."""
    out = Review()
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return _fail(out, "bad_request", f"the request is not JSON ({exc})")
    request = doc.get("request") if isinstance(doc, dict) else None
    if not isinstance(request, dict):
        return _fail(out, "bad_request", "the request is not an AdmissionReview (no request)")
    out.uid = str(request.get("uid") or "")
    if doc.get("apiVersion") != API_VERSION or doc.get("kind") != "AdmissionReview" or not out.uid:
        return _fail(out, "bad_request", f"the request is not an {API_VERSION} AdmissionReview with a uid")
    kind = _mapping(request.get("kind"))
    if (kind.get("group"), kind.get("kind"), request.get("operation")) != ("", "Pod", "CREATE") or request.get(
        "subResource"
    ):
        return out  # the webhook configuration sends only Pod CREATE; anything else passes untouched
    pod = request.get("object")
    if not isinstance(pod, dict) or not isinstance(pod.get("spec"), dict):
        return _fail(out, "bad_request", "the request's object is not a Pod with a spec")
    meta = _mapping(pod.get("metadata"))
    namespace = request.get("namespace") or meta.get("namespace") or "?"
    where = f"Pod {namespace}/{meta.get('name') or meta.get('generateName') or '?'}"
    annotations = _mapping(meta.get("annotations"))
    try:
        return _mutate(out, pod, annotations, opts, where)
    except AnnotationError as exc:
        return _fail(out, "bad_annotation", str(exc))
    except ConfigError as exc:
        return _fail(out, "not_injectable", str(exc))
    except Exception as exc:  # noqa: BLE001 - a bug must not block pod creation
        log.exception("%s: injection failed", where)
        return _fail(out, "internal", f"{where}: internal error ({type(exc).__name__}); see the webhook's log")


def _mutate(out: Review, pod: dict, annotations: dict, opts: InjectOptions, where: str) -> Review:
    if opted_out(annotations, where):
        out.outcome = "opted_out"
        return out
    if ANN_STATUS in annotations:
        out.outcome = "already_injected"
        return out
    mutated = copy.deepcopy(pod)
    meta = mutated.setdefault("metadata", {})
    owners = meta.get("ownerReferences") if isinstance(meta.get("ownerReferences"), list) else []
    # A Job's pods get the Job's notes (a legacy sidecar never lets it complete).
    kind = next((str(o["kind"]) for o in owners if isinstance(o, dict) and o.get("kind") in JOB_KINDS), "Pod")
    report = Report()
    injected = inject_pod(meta, mutated["spec"], opts, where, kind, report)
    out.warnings = [f"mongoproxy: {note}" for note in report.notes]
    if not injected:
        out.outcome = "skipped"
        return out
    out.patch = json_patch(pod, mutated)
    out.outcome = "injected"
    return out
