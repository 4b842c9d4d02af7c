"""The YAML round trip: load manifests, find every pod template (recursing into Lists), dump them with layout and comments kept."""

from __future__ import annotations

import io
from typing import Any

from mongoproxy.errors import ConfigError
from mongoproxy.inject.names import POD_TEMPLATE_PATHS
from mongoproxy.inject.pod import Report, _annotations, _insert_key, _is_map, _map_type, inject_pod
from mongoproxy.inject.settings import InjectOptions


def _name_of(obj: Any) -> str:
    kind = obj.get("kind", "?") if _is_map(obj) else "?"
    meta = obj.get("metadata") if _is_map(obj) else None
    name = meta.get("name") or meta.get("generateName") if _is_map(meta) else None
    return f"{kind}/{name or '?'}"


def _resolve(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not _is_map(obj):
            return None
        obj = obj.get(key)
    return obj


def inject_object(obj: Any, opts: InjectOptions, report: Report, where: str = "") -> None:
    """Inject into one parsed document in place (recursing into `List` items)."""
    if obj is None:
        return
    if not _is_map(obj) or "kind" not in obj:
        report.notes.append(f"{where or 'a document'} is not a Kubernetes object (no kind): passed through unchanged")
        return
    kind = str(obj.get("kind"))
    name = _name_of(obj)
    if isinstance(obj.get("items"), list) and (kind == "List" or kind.endswith("List")):
        for i, item in enumerate(obj["items"]):
            inject_object(item, opts, report, f"{name} item {i}")
        return
    path = POD_TEMPLATE_PATHS.get(kind)
    if path is None:
        report.notes.append(f"{name} has no pod template: passed through unchanged")
        return
    template = _resolve(obj, path)
    if not _is_map(template):
        raise ConfigError(f"{name}: {'.'.join(path) or 'the object'} is missing: fix the manifest")
    if "metadata" not in template or template.get("metadata") is None:
        cmap = _map_type()
        _insert_key(template, "metadata", cmap(), before="spec")
    workload_ann = _annotations(obj.get("metadata")) if path else {}
    inject_pod(template["metadata"], template.get("spec"), opts, name, kind, report, workload_ann)


# ---- YAML in and out ----


def _guess_indent(doc: Any) -> tuple[int, int, int]:
    """(mapping, sequence, offset) indentation used by a loaded document; kubectl's style when unknown."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    mapping = sequence = offset = None
    stack = [doc]
    seen = 0
    while stack and seen < 10000 and (mapping is None or sequence is None):
        node = stack.pop()
        seen += 1
        if isinstance(node, CommentedMap):
            if node.fa.flow_style():
                continue
            for key in node:
                value = node[key]
                try:
                    kline, kcol = node.lc.key(key)
                except (KeyError, TypeError, AttributeError):
                    continue
                if mapping is None and isinstance(value, CommentedMap) and value and not value.fa.flow_style():
                    first = next(iter(value))
                    vline, vcol = value.lc.key(first)
                    if vline > kline:
                        mapping = vcol - kcol
                if sequence is None and isinstance(value, CommentedSeq) and value and not value.fa.flow_style():
                    dline, dcol = value.lc.line, value.lc.col
                    iline, icol = value.lc.item(0)
                    if dline > kline:
                        offset, sequence = dcol - kcol, icol - kcol
                stack.append(value)
        elif isinstance(node, CommentedSeq):
            stack.extend(node)
    mapping = mapping if mapping and mapping > 0 else 2
    if sequence is None or offset is None or offset < 0 or sequence < offset + 2:
        sequence, offset = mapping, 0
    return mapping, sequence, offset


def _yaml(indent: tuple[int, int, int] = (2, 2, 0)):
    try:
        from ruamel.yaml import YAML
    except ImportError:  # pragma: no cover - a dependency of the package
        raise ConfigError("mongoproxy inject needs ruamel.yaml: pip install ruamel.yaml") from None
    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.width = 4096  # never fold long lines (args, JSON annotations)
    y.indent(mapping=indent[0], sequence=indent[1], offset=indent[2])
    return y


def load_documents(text: str, source: str) -> list[Any]:
    """Every YAML document in `text`; invalid YAML is one ConfigError naming the place."""
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    try:
        return list(_yaml().load_all(text))
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(exc.problem or exc.context or "syntax error").split())
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}: fix the document") from None
    except YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(exc).split())}: fix the document") from None


def dump_documents(docs: list[Any], explicit_start: bool) -> str:
    """The documents back as YAML, each with the indentation it came with."""
    out = io.StringIO()
    first = True
    for doc in docs:
        if doc is None:
            continue  # an empty document carries nothing for kubectl
        if not first or explicit_start:
            out.write("---\n")
        first = False
        buf = io.StringIO()
        _yaml(_guess_indent(doc)).dump(doc, buf)
        out.write(buf.getvalue())
    return out.getvalue()


def _starts_explicit(text: str) -> bool:
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("%"):
            continue
        return stripped == "---" or stripped.startswith("--- ")
    return False


def inject_text(text: str, opts: InjectOptions, source: str = "<stdin>", report: Report | None = None) -> str:
    """Inject into every pod template of the YAML `text`; returns the new YAML."""
    report = report if report is not None else Report()
    docs = load_documents(text, source)
    for i, doc in enumerate(docs):
        inject_object(doc, opts, report, f"{source} document {i + 1}")
    return dump_documents(docs, _starts_explicit(text))
