"""The Grafana dashboard: it loads into Grafana's model, and every PromQL query names metrics and labels the proxy exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.system import require_tool

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "mongoproxy-dashboard.json"

COMMAND_LABELS = {"op", "db", "collection", "app", "server", "replicaset"}
# Exported families (issue 3 names) -> (type, labels). Histograms expose _bucket/_sum/_count, counters _total.
EXPORTED: dict[str, tuple[str, set[str]]] = {
    "mongoproxy_response_latency_seconds": ("histogram", COMMAND_LABELS),
    "mongoproxy_documents_returned": ("histogram", COMMAND_LABELS),
    "mongoproxy_documents_changed": ("histogram", COMMAND_LABELS),
    "mongoproxy_request_size_bytes": ("histogram", COMMAND_LABELS),
    "mongoproxy_response_size_bytes": ("histogram", COMMAND_LABELS),
    "mongoproxy_command_errors": ("counter", {"op", "db", "collection", "code_name"}),
    "mongoproxy_client_connections_established": ("counter", set()),
    "mongoproxy_client_disconnections": ("counter", set()),
    "mongoproxy_connections_active": ("gauge", set()),
    "mongoproxy_upstream_connect_errors": ("counter", {"reason"}),
    "mongoproxy_server_connect_time_seconds": ("histogram", {"server"}),
    "mongoproxy_client_bytes_received": ("counter", set()),
    "mongoproxy_client_bytes_sent": ("counter", set()),
    "mongoproxy_decode_errors": ("counter", {"direction", "reason"}),
    "mongoproxy_unmatched_replies": ("counter", set()),
    "mongoproxy_events_dropped": ("counter", {"sink"}),
    "mongoproxy_info": ("gauge", {"version", "mode", "upstream_tls"}),
    # Also exported by the metrics sink, beyond the list.
    "mongoproxy_requests_dropped": ("counter", set()),
    "mongoproxy_label_overflow": ("counter", {"label"}),
    "mongoproxy_sink_errors": ("counter", {"sink"}),
    # The query digest's own health (its shapes are never labels).
    "mongoproxy_digest_shapes": ("gauge", set()),
    "mongoproxy_digest_memory_bytes": ("gauge", set()),
    "mongoproxy_digest_evictions": ("counter", set()),
}
# Exported by the mirror sink (run --mirror).
MIRROR_EXPORTED: dict[str, tuple[str, set[str]]] = {
    "mongoproxy_mirror_requests": ("counter", {"op"}),
    "mongoproxy_mirror_dropped": ("counter", {"reason"}),
    "mongoproxy_mirror_latency_seconds": ("histogram", {"target", "op", "collection"}),
    "mongoproxy_mirror_divergences": ("counter", {"op", "collection", "kind"}),
    "mongoproxy_mirror_shadow_errors": ("counter", {"op", "error"}),
    "mongoproxy_mirror_compared": ("counter", {"op"}),
    "mongoproxy_mirror_queue_depth": ("gauge", set()),
}
EXPORTED.update(MIRROR_EXPORTED)
# Labels Prometheus itself attaches to every target (PodMonitor/ServiceMonitor and the usual pod relabelling).
TARGET_LABELS = {"namespace", "pod", "container", "job", "instance", "endpoint", "service"}


def sample_names(family: str, kind: str) -> dict[str, set[str]]:
    """Series names of one family -> their labels."""
    labels = EXPORTED[family][1] | TARGET_LABELS
    if kind == "histogram":
        return {f"{family}_bucket": labels | {"le"}, f"{family}_sum": labels, f"{family}_count": labels}
    if kind == "counter":
        return {f"{family}_total": labels}
    return {family: labels}


SERIES: dict[str, set[str]] = {}
for _family, (_kind, _) in EXPORTED.items():
    SERIES.update(sample_names(_family, _kind))


# ---- a small PromQL reader: enough to find every metric, matcher, grouping and legend label ----

AGGREGATORS = {
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
}
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
}
TOKEN = re.compile(
    r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<duration>\[[^\]]*\])
  | (?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){},])
  | (?P<space>\s+)
""",
    re.VERBOSE,
)


def tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        assert m, f"cannot read PromQL at {expr[pos : pos + 20]!r} in {expr!r}"
        pos = m.end()
        if m.lastgroup != "space":
            out.append((m.lastgroup, m.group()))
    return out


def analyse(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """([(metric, matcher labels)], grouping labels) of one expression."""
    toks = tokens(expr)
    selectors: list[tuple[str, set[str]]] = []
    grouping: set[str] = set()
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "ident" and text in ("by", "without", "on", "ignoring", "group_left", "group_right") and nxt == "(":
            j = i + 2
            while toks[j][1] != ")":
                if toks[j][0] == "ident":
                    grouping.add(toks[j][1])
                j += 1
            i = j + 1
            continue
        if kind == "ident" and (nxt == "(" or text in AGGREGATORS or text in KEYWORDS):
            i += 1  # a function, an aggregation or a keyword
            continue
        if kind == "ident":
            labels: set[str] = set()
            i += 1
            if i < len(toks) and toks[i][1] == "{":
                i += 1
                while toks[i][1] != "}":
                    if toks[i][0] == "ident":
                        labels.add(toks[i][1])
                        assert toks[i + 1][1] in ("=", "!=", "=~", "!~"), expr
                        assert toks[i + 2][0] == "string", expr
                        i += 3
                    else:
                        i += 1  # comma
                i += 1
            selectors.append((text, labels))
            continue
        i += 1
    return selectors, grouping


def test_reader_finds_names_labels_and_grouping():
    sel, grouping = analyse(
        'histogram_quantile(0.99, sum by (le, op) (rate(m_bucket{a=~"$x", b!="y"}[5m]))) '
        "/ on (op) group_left count(other)"
    )
    assert sel == [("m_bucket", {"a", "b"}), ("other", set())]
    assert grouping == {"le", "op"}


# ---- the dashboard ----


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def queries(dash: dict) -> list[tuple[str, str, str]]:
    """(where, expr, legendFormat) of every panel target and template variable."""
    out = []
    for p in all_panels(dash):
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r} {t['refId']}", t["expr"], t.get("legendFormat", "")))
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
            assert m, f"variable {v['name']}: expected label_values(selector, label), got {q!r}"
            out.append((f"variable {v['name']}", m.group(1), "{{" + m.group(2) + "}}"))
    return out


def test_series_table_matches_the_metrics_sink():
    """The names above are what the real metrics and digest sinks register (no traffic needed)."""
    from prometheus_client import CollectorRegistry

    from mongoproxy.sinks.digest import DigestSink
    from mongoproxy.sinks.metrics import MetricsSink

    registry = CollectorRegistry()
    MetricsSink(registry, "test", "transparent")
    registry.register(DigestSink())
    real = {fam.name: fam.type for fam in registry.collect()}
    for family, (kind, _) in EXPORTED.items():
        if family not in MIRROR_EXPORTED:
            assert real.get(family) == kind, f"{family}: the sink exports {real.get(family)!r}, the table says {kind!r}"


def test_series_table_matches_the_mirror_sink():
    """The mirror's names and labels are what MirrorSink registers (its shadow thread is not started)."""
    from prometheus_client import CollectorRegistry

    from mongoproxy.sinks.mirror import MirrorSink

    registry = CollectorRegistry()
    sink = MirrorSink("mongodb://127.0.0.1:1", registry)
    sink.latency.labels("shadow", "find", "c").observe(0.1)
    for name, labels in (("divergences", ("find", "c", "ok")), ("mirrored", ("find",)), ("dropped", ("queue_full",))):
        getattr(sink, name).labels(*labels).inc()
    sink.shadow_errors.labels("find", "NetworkTimeout").inc()
    sink.compared.labels("find").inc()
    real = {fam.name: fam for fam in registry.collect()}
    for family, (kind, labels) in MIRROR_EXPORTED.items():
        assert real[family].type == kind, family
        got = {k for s in real[family].samples for k in s.labels} - {"le"}
        assert got == labels, (family, got)


def test_required_panels_exist(dashboard):
    titles = [p["title"] for p in all_panels(dashboard)]
    for needed in (
        "p50 latency by op",
        "p99 latency by op",
        "p50 latency by collection",
        "p99 latency by collection",
        "Command rate by op",
        "Errors by code",
        "Documents returned / s by collection",
        "Documents changed / s by op",
        "Client connections by pod",
        "Decode errors / s",
        "Events dropped / s",
        "Mirror divergences / s",
        "Mirror p99 latency: primary vs shadow",
    ):
        assert needed in titles
    assert len(set(p["id"] for p in all_panels(dashboard))) == len(all_panels(dashboard))


def test_a_panel_links_to_the_query_digest(dashboard):
    """Shapes are not labels, so the dashboard sends the reader to the digest: the web view and GET /digest."""
    (panel,) = [p for p in all_panels(dashboard) if "digest" in p["title"].lower() and p["type"] != "row"]
    urls = [link["url"] for link in panel["links"]]
    assert "http://localhost:9898/" in urls and any("/digest?" in u for u in urls)
    assert "port-forward" in panel["description"] and "mongoproxy top" in panel["description"]
    used = {name for t in panel["targets"] for name, _ in analyse(t["expr"])[0]}
    assert used == {"mongoproxy_digest_shapes", "mongoproxy_digest_memory_bytes", "mongoproxy_digest_evictions_total"}


def test_every_query_names_exported_metrics_and_labels(dashboard):
    found = set()
    for where, expr, legend in queries(dashboard):
        selectors, grouping = analyse(expr)
        assert selectors, f"{where}: no metric in {expr!r}"
        available: set[str] = set()
        for name, labels in selectors:
            assert name in SERIES, f"{where}: {name} is not exported by mongoproxy"
            unknown = labels - SERIES[name]
            assert not unknown, f"{where}: {name} has no label(s) {sorted(unknown)}"
            available |= SERIES[name]
            found.add(name)
        assert grouping <= available, f"{where}: groups by {sorted(grouping - available)}, which no metric has"
        shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        if grouping:
            assert shown <= grouping, f"{where}: legend uses {sorted(shown - grouping)}, lost by the aggregation"
        else:
            assert shown <= available, f"{where}: legend uses {sorted(shown - available)}"
    # The dashboard covers the proxy's main families.
    for family in (
        "mongoproxy_response_latency_seconds_bucket",
        "mongoproxy_command_errors_total",
        "mongoproxy_documents_returned_sum",
        "mongoproxy_documents_changed_sum",
        "mongoproxy_connections_active",
        "mongoproxy_decode_errors_total",
        "mongoproxy_events_dropped_total",
    ):
        assert family in found


def test_queries_parse_with_promtool(dashboard, tmp_path):
    promtool = require_tool("promtool")
    rules = []
    for i, (where, expr, _) in enumerate(queries(dashboard)):
        concrete = expr.replace("$__rate_interval", "5m")
        concrete = re.sub(r"\$\{?\w+\}?", ".*", concrete)
        rules.append({"record": f"dashboard:query_{i}", "expr": concrete, "labels": {"where": where}})
    path = tmp_path / "rules.json"  # promtool reads YAML, and JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_loads_into_grafana_model(dashboard):
    """Grafana's Foundation SDK reads the dashboard; every key written survives its model, so none is misspelled."""
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import prometheus
    from grafana_foundation_sdk.models.dashboard import Dashboard, RowPanel

    plugins.register_default_plugins()
    model = Dashboard.from_json(dashboard)
    assert model.uid == "mongoproxy-overview" and model.schema_version == dashboard["schemaVersion"]
    assert len(model.panels) == len(dashboard["panels"])
    for raw, panel in zip(dashboard["panels"], model.panels):
        if raw["type"] == "row":
            assert isinstance(panel, RowPanel)
            continue
        assert [t.expr for t in panel.targets] == [t["expr"] for t in raw["targets"]]
        assert all(isinstance(t, prometheus.Dataquery) for t in panel.targets)
    encoded = json.loads(json.dumps(model, cls=JSONEncoder))

    def kept(orig, new, path):
        if isinstance(orig, dict):
            assert isinstance(new, dict), path
            for k, v in orig.items():
                if v is None:
                    continue
                assert k in new, f"{path}.{k} is not part of Grafana's model"
                kept(v, new[k], f"{path}.{k}")
        elif isinstance(orig, list):
            assert isinstance(new, list) and len(new) == len(orig), path
            for i, (a, b) in enumerate(zip(orig, new)):
                kept(a, b, f"{path}[{i}]")
        else:
            assert orig == new, f"{path}: {orig!r} became {new!r}"

    for i, (raw, new) in enumerate(zip(dashboard["panels"], encoded["panels"])):
        kept(raw, new, f"panels[{i}]")


def test_panels_tile_the_grid(dashboard):
    """No two panels overlap and none is wider than the 24-column grid."""
    cells = {}
    for p in all_panels(dashboard):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
