"""Cheap samples of a running proxy process: RSS and fds from /proc, gauges and counters from /metrics.

Shared by the soak (benchmarks/soak.py) and the fault-survival run (benchmarks/fault_survival.py).
"""

from __future__ import annotations

import os
import time
import urllib.request
from dataclasses import asdict, dataclass

from prometheus_client.parser import text_string_to_metric_families

from benchmarks import procs

# Families read from /metrics -> the Sample field they fill (counters are summed over their labels).
_FAMILIES = {
    "mongoproxy_connections_active": "connections",
    "mongoproxy_pending_requests": "pending",
    "mongoproxy_exhaust_streams": "exhaust",
    "mongoproxy_asyncio_tasks": "tasks",
    "mongoproxy_decode_errors": "decode_errors",
    "mongoproxy_unmatched_replies": "unmatched",
    "mongoproxy_requests_dropped": "requests_dropped",
    "mongoproxy_client_connections_established": "established",
    "mongoproxy_client_disconnections": "disconnections",
    "mongoproxy_upstream_connect_errors": "upstream_errors",
    "mongoproxy_sink_errors": "sink_errors",
}


@dataclass
class Sample:
    """One observation of the proxy process."""

    t: float  # seconds since the run started
    rss_kb: int = 0
    fds: int = 0
    connections: float = 0
    pending: float = 0
    exhaust: float = 0
    tasks: float = 0
    decode_errors: float = 0
    unmatched: float = 0
    requests_dropped: float = 0
    established: float = 0
    disconnections: float = 0
    upstream_errors: float = 0
    sink_errors: float = 0
    commands: float = 0  # requests that got an event (the latency histogram's _count, all series)

    def as_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)


def fd_count(pid: int) -> int:
    """Open file descriptors of process `pid`."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def scrape(admin_port: int, timeout: float = 5.0) -> dict[str, float]:
    """The proxy's /metrics as {field: value} for the families above, plus `commands`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        field = _FAMILIES.get(fam.name)
        if field is not None:
            out[field] = sum(s.value for s in fam.samples if not s.name.endswith("_created"))
        elif fam.name == "mongoproxy_response_latency_seconds":
            out["commands"] = sum(s.value for s in fam.samples if s.name.endswith("_count"))
    return out


def sample(proxy: procs.Proc, t0: float) -> Sample:
    """RSS, fds and the /metrics values of the proxy right now."""
    s = Sample(t=time.monotonic() - t0, rss_kb=proxy.rss_kb(), fds=fd_count(proxy.pid))
    for k, v in scrape(proxy.admin_port).items():  # type: ignore[attr-defined]
        setattr(s, k, v)
    return s
