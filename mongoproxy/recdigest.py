"""`mongoproxy digest FILE...`: the query digest of a recording (the proxy's pcapng files or tcpdump captures).

The replay reader reassembles each TCP connection into messages; each connection's messages then go, in capture
order, through the proxy's own FrameScanner and Tracker into the digest sink, so a recording gives the same keys and
counts as the live digest of the same traffic. Latencies are the capture's: request first packet to reply last packet.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mongoproxy import digestview
from mongoproxy._bson_parser import RENDER_REDACTED
from mongoproxy.digest import SORTS, Digest
from mongoproxy.errors import ReplayError
from mongoproxy.events import Connection, SinkBus
from mongoproxy.protocol.framing import FrameScanner

# The one place this module touches the replay package: its reader (packets, TCP, framing) and input expansion.
from mongoproxy.replay.extract import _guess_client, expand_inputs
from mongoproxy.replay.reader import Reassembler, iter_packets, require_dpkt
from mongoproxy.sinks.digest import DigestSink
from mongoproxy.tracker import Tracker


def add_parser(sub: Any) -> None:
    """Register `mongoproxy digest`."""
    p = sub.add_parser(
        "digest",
        help="query digest of recordings: which query shapes ran, how often, how slow",
        description="Compute the per-shape query digest (the table of GET /digest and `mongoproxy top`) offline "
        "from the proxy's pcapng recordings (--record) or tcpdump captures.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="pcap/pcapng files or directories of them")
    p.add_argument("--json", action="store_true", help="print the digest JSON document (docs/digest.md)")
    p.add_argument("--sort", choices=list(SORTS), default="total_time", help="order (default: total_time)")
    p.add_argument("--limit", type=int, default=None, help="shapes shown (default: all)")
    p.add_argument("--ns", action="append", default=[], help="only these namespaces: db.collection, db.* or db")
    p.add_argument("--app", help="only this client application name")
    p.set_defaults(func=main)


def digest_files(paths: list[str], warnings: list[str]) -> Digest:
    """The digest of every MongoDB connection in the capture files."""
    files = expand_inputs(paths)
    require_dpkt()
    reassembler = Reassembler()
    for path in files:
        for pkt in iter_packets(path, warnings):
            try:
                reassembler.add(pkt, path)
            except ReplayError as exc:
                raise ReplayError(f"{path}: packet at offset {pkt.offset}: {exc}") from None
    sink = DigestSink(max_shapes=1 << 30)  # offline: keep every shape
    sink.digest.to_wall = int  # capture timestamps are Unix ns already
    sink.digest.since_ns = min((f.first_ns for f in reassembler.flows), default=sink.digest.since_ns)
    bus = SinkBus([sink])
    mongo = sum(_digest_flow(flow, bus, warnings) for flow in reassembler.flows)
    if not mongo:
        raise ReplayError(
            f"{', '.join(files)}: no MongoDB traffic ({reassembler.packets} packets, {len(reassembler.flows)} TCP "
            "connections, none carrying the MongoDB wire protocol)"
        )
    sink.digest.max_shapes = len(sink.digest)
    return sink.digest


def _digest_flow(flow: Any, bus: SinkBus, warnings: list[str]) -> bool:
    """Feed one TCP connection's messages to the digest; False when it carried no MongoDB request."""
    if flow.client is None:
        flow.client = _guess_client(flow)
        if flow.client is None:
            return False  # not MongoDB, or no way to tell the client
    client, server = flow.halves[flow.client], flow.halves[flow.server]
    if not client.messages:
        return False
    if client.gap or server.gap:
        warnings.append(f"connection {flow.label()}: packets missing from the capture; counted up to the gap")
    conn = Connection(id=flow.index + 1, client_host=str(flow.client[0]), client_port=int(flow.client[1]))
    tracker = Tracker(conn, bus, max_pending=1_000_000)
    requests = FrameScanner(False, tracker.on_request, lambda *a: None, render=RENDER_REDACTED)
    replies = FrameScanner(True, tracker.on_reply, lambda *a: None)
    # Requests before replies at equal times: a reply never precedes its request on the wire.
    stream = sorted(
        [(m.first_ns, 0, i, m, requests) for i, m in enumerate(client.messages)]
        + [(m.first_ns, 1, i, m, replies) for i, m in enumerate(server.messages)],
        key=lambda t: t[:3],
    )
    for _, _, _, m, scanner in stream:
        scanner.feed(m.data[:1], m.first_ns)  # first byte at the first packet's time, the rest at the last's
        scanner.feed(m.data[1:], m.last_ns)
    return True


def main(args: argparse.Namespace) -> int:
    """Run `mongoproxy digest`."""
    warnings: list[str] = []
    digest = digest_files(args.files, warnings)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    doc = digest.to_json(args.sort, args.limit, args.ns, args.app)
    if args.json:
        sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(digestview.plain_table(doc, examples=True))
    return 0
