"""Wireshark's mongo dissector (tshark) and the proxy agree on every message of a mixed workload.

tcpdump captures the loopback traffic on both sides of an in-process proxy while real clients run: pymongo
against SecantusDB (OP_MSG CRUD, kind-1 inserts, getMores, an error, a w:0 insert, the monitor's streaming hello),
pymongo with zlib, snappy and zstd against a scripted server that negotiates compression, and a raw client
speaking the legacy opcodes (OP_QUERY handshake and query, OP_INSERT/UPDATE/DELETE/GET_MORE/KILL_CURSORS,
OP_COMMAND) plus a checksummed OP_MSG. tshark then decodes the capture independently. For every message:
- each client-side message is one proxy event (requests by requestID, replies by their own requestID), and the
  two agree on opcode, requestID, responseTo (a reply answers its request, or the previous streamed reply),
  command name and collection (raw and attributed) wherever tshark decodes them;
- the server side of the proxy carries exactly the same sequence of messages, connection by connection.
tshark 4.0 (Debian 12) inflates zlib and snappy bodies but not zstd: for zstd only the header fields and the
compressor are compared, and the zstd bodies are checked against the proxy by the integration tests.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass

import pymongo.errors
import pytest
from pymongo import MongoClient, WriteConcern

from mongoproxy import wire as mwire
from mongoproxy.protocol.commands import COLLECTION_COMMANDS
from tests.integration.test_protocol_coverage import legacy_handler
from tests.support import wire
from tests.support.inprocess import ProxyThread
from tests.support.scripted_server import MongoHandler, ScriptedServer
from tests.support.secantus import SecantusServer
from tests.support.system import require_root, require_tool, unavailable

pytestmark = pytest.mark.timeout(180)

SENTINEL = b"mongoproxy-tshark-capture-complete"


@dataclass(frozen=True)
class Pdu:
    """One MongoDB message as tshark decoded it."""

    stream: int
    to_server: bool
    client_port: int
    server_port: int
    opcode: int
    request_id: int
    response_to: int
    original_opcode: int | None = None
    compressor: int | None = None
    decoded: bool = True  # False when tshark could not inflate the body
    command: str | None = None
    first_value: str | None = None  # the command's first value when a string
    getmore_collection: str | None = None
    namespace: str | None = None  # legacy fullCollectionName

    def key(self) -> tuple:
        """Everything but the TCP stream: equal on both sides of the proxy."""
        return (
            self.to_server,
            self.opcode,
            self.request_id,
            self.response_to,
            self.original_opcode,
            self.compressor,
            self.decoded,
            self.command,
            self.first_value,
            self.getmore_collection,
            self.namespace,
        )


def _field(elem: ET.Element, name: str) -> ET.Element | None:
    return elem.find(f".//field[@name='{name}']")


def _first_element(doc: ET.Element | None) -> tuple[str | None, str | None, dict]:
    """(first key, its value when a string, {top-level key: string value}) of a dissected BSON document."""
    if doc is None:
        return None, None, {}
    elements = doc.find("field[@name='mongo.elements']")
    if elements is None:
        return None, None, {}
    names = elements.findall("field[@name='mongo.element.name']")
    strings = {}
    for n in names:
        v = n.find("field[@name='mongo.element.value.string']")
        if v is not None:
            strings[n.get("show")] = v.get("show")
    if not names:
        return None, None, strings
    first = names[0].get("show")
    return first, strings.get(first), strings


def parse_pdml(path: str, server_ports: set[int]) -> list[Pdu]:
    """Every mongo PDU in the PDML, in capture order."""
    out = []
    for _, pkt in ET.iterparse(path):
        if pkt.tag != "packet":
            continue
        tcp = pkt.find("proto[@name='tcp']")
        if tcp is None:
            pkt.clear()
            continue
        stream = int(_field(tcp, "tcp.stream").get("show"))
        src, dst = int(_field(tcp, "tcp.srcport").get("show")), int(_field(tcp, "tcp.dstport").get("show"))
        to_server = dst in server_ports
        for proto in pkt.findall("proto[@name='mongo']"):

            def get(name: str, proto: ET.Element = proto) -> str | None:
                f = proto.find(f"field[@name='{name}']")
                return f.get("show") if f is not None else None

            opcode = int(get("mongo.opcode"))
            info = dict(
                stream=stream,
                to_server=to_server,
                client_port=src if to_server else dst,
                server_port=dst if to_server else src,
                opcode=opcode,
                request_id=int(get("mongo.request_id"), 16),
                response_to=int(get("mongo.response_to"), 16),
            )
            body_opcode = opcode
            comp = proto.find("field[@name='mongo.compression']")
            if comp is not None:
                body_opcode = int(comp.find("field[@name='mongo.compression.original_opcode']").get("show"))
                info["original_opcode"] = body_opcode
                info["compressor"] = int(comp.find("field[@name='mongo.compression.compressor']").get("show"))
                info["decoded"] = proto.find(".//field[@name='mongo.compression.unsupported_compressed']") is None
            if body_opcode == mwire.OP_MSG and to_server:
                body = None
                for section in proto.findall("field[@name='mongo.msg.sections.section']"):
                    kind = section.find("field[@name='mongo.msg.sections.section.kind']")
                    if kind is not None and kind.get("show") == "0":
                        body = section.find("field[@name='mongo.msg.sections.section.body']")
                        break
                name, value, strings = _first_element(body)
                info.update(
                    command=name,
                    first_value=value,
                    getmore_collection=strings.get("collection") if name == "getMore" else None,
                )
            elif body_opcode == mwire.OP_QUERY:
                info["namespace"] = get("mongo.full_collection_name")
                if info["namespace"].endswith(".$cmd"):
                    name, value, _ = _first_element(proto.find("field[@name='mongo.query']"))
                    info.update(command=name, first_value=value)
            elif body_opcode in (mwire.OP_INSERT, mwire.OP_UPDATE, mwire.OP_DELETE, mwire.OP_GET_MORE):
                info["namespace"] = get("mongo.full_collection_name")
            elif body_opcode == mwire.OP_COMMAND:
                info["command"] = get("mongo.commandname")
                info["namespace"] = get("mongo.database")
            out.append(Pdu(**info))
        pkt.clear()
    return out


class Capture:
    """tcpdump on the loopback interface for the given ports; stop() waits until a sentinel is on disk."""

    def __init__(self, path: str, ports: list[int]) -> None:
        self.path = path
        self.ports = ports
        self.sentinel = socket.socket()
        self.sentinel.bind(("127.0.0.1", 0))
        self.sentinel.listen()
        self.sentinel_port = self.sentinel.getsockname()[1]
        expr = " or ".join(f"tcp port {p}" for p in [*ports, self.sentinel_port])
        # No --immediate-mode: libpcap then uses fixed slots of the snapshot length (only 8 in the default 2 MB
        # buffer) and drops under load. Packets reach the file in blocks instead; the sentinel says when.
        self.proc = subprocess.Popen(
            [require_tool("tcpdump"), "-i", "lo", "-U", "-B", "32768", "-s", "0", "-w", path, expr],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        line = self.proc.stderr.readline().decode()
        if "listening on" not in line:
            self.proc.kill()
            unavailable(f"tcpdump cannot capture on lo: {line.strip() or self.proc.stderr.read().decode()}")

    def stop(self) -> None:
        """Send the sentinel, wait until tcpdump has written it, then stop tcpdump."""
        with socket.create_connection(("127.0.0.1", self.sentinel_port)) as s:
            accepted, _ = self.sentinel.accept()
            s.sendall(SENTINEL)
            accepted.close()
        deadline = time.monotonic() + 20
        while True:
            with open(self.path, "rb") as f:
                if SENTINEL in f.read():
                    break
            assert time.monotonic() < deadline, "tcpdump never wrote the sentinel packet"
            time.sleep(0.05)
        self.proc.send_signal(signal.SIGINT)
        stats = self.proc.communicate(timeout=20)[1].decode()
        self.sentinel.close()
        assert "\n0 packets dropped by kernel" in "\n" + stats, stats


def workload(ports: list[int], secantus_db: str) -> None:
    """Real clients and a raw legacy client, each through one of the proxy's listeners."""
    secantus_port, compress_port, legacy_port = ports
    uri = "mongodb://127.0.0.1:{}/?directConnection=true"
    with MongoClient(uri.format(secantus_port), appname="tshark-a", heartbeatFrequencyMS=500) as c:
        db = c[secantus_db]
        db.items.insert_many([{"_id": i, "k": i % 3} for i in range(9)])
        assert len(list(db.items.find({}, batch_size=2).sort("_id", 1))) == 9
        db.items.update_many({"k": 1}, {"$set": {"seen": True}})
        db.items.delete_one({"_id": 8})
        assert len(list(db.items.aggregate([{"$group": {"_id": "$k"}}]))) == 3
        with pytest.raises(pymongo.errors.DuplicateKeyError):
            db.items.insert_one({"_id": 1})
        db.get_collection("logs", write_concern=WriteConcern(w=0)).insert_one({"m": 1})
        db.command("ping")
        time.sleep(1.6)  # let the monitor's streaming hello stream a few replies
    for comp in ("zlib", "snappy", "zstd"):
        with MongoClient(uri.format(compress_port), compressors=comp, appname=f"tshark-{comp}") as c:
            c.shop.orders.insert_many([{"_id": i, "comp": comp} for i in range(5)])
            c.shop.orders.find_one({"_id": 1})
            list(c.shop.orders.aggregate([{"$match": {"comp": comp}}]))
    with socket.create_connection(("127.0.0.1", legacy_port), timeout=10) as sock:
        requests = [
            wire.encode_op_query({"isMaster": 1, "client": {"application": {"name": "tshark-legacy"}}}, request_id=1),
            wire.encode_op_insert("shop.items", [{"_id": 1}, {"_id": 2}], request_id=2),
            wire.encode_op_update("shop.items", {"_id": 1}, {"$set": {"x": 1}}, request_id=3),
            wire.encode_op_delete("shop.items", {"_id": 2}, request_id=4),
            wire.encode_op_query({"x": 1}, full_collection_name="shop.items", number_to_return=3, request_id=5),
            wire.encode_op_get_more("shop.items", 77, request_id=6),
            wire.encode_op_kill_cursors([77], request_id=7),
            wire.encode_op_command("shop", "ping", {}, {"ping": 1}, request_id=8),
            wire.encode_op_msg({"find": "items", "filter": {}, "$db": "shop"}, checksum=True, request_id=9),
        ]
        for r in requests:
            sock.sendall(r)
            if wire.decode_message(r).opcode not in (
                wire.OP_INSERT,
                wire.OP_UPDATE,
                wire.OP_DELETE,
                wire.OP_KILL_CURSORS,
            ):
                assert wire.recv_message(sock) is not None
    # A client that connects and closes before sending a byte, as pymongo's RTT monitor can when its client closes.
    socket.create_connection(("127.0.0.1", secantus_port), timeout=10).close()


def test_tshark_and_the_proxy_agree_on_every_message(tmp_path):
    tshark = require_tool("tshark")
    require_tool("tcpdump")
    require_root("capturing on the loopback interface needs root (CAP_NET_RAW): run the suite as root")
    with (
        SecantusServer() as secantus,
        ScriptedServer(MongoHandler(compressors=("zlib", "snappy", "zstd"))) as compressing,
        ScriptedServer(legacy_handler) as legacy,
    ):
        upstreams = [secantus.port, compressing.port, legacy.port]
        specs = tuple(f"0:127.0.0.1:{p}" for p in upstreams)
        with ProxyThread(specs=specs) as proxy:
            ports = proxy.proxy.ports
            capture = Capture(str(tmp_path / "capture.pcap"), ports + upstreams)
            workload(ports, f"tshark_{os.getpid()}")
            # The proxy may accept the workload's silent connection after the client has closed it: wait for it too.
            proxy.wait_until(
                lambda: (
                    len(proxy.sink.closed) == len(proxy.sink.opened)
                    and any(c.bytes_from_client == 0 for c in proxy.sink.closed)
                ),
                what="all connections closed, the one closed before a byte included",
            )
            capture.stop()
            events = list(proxy.sink.commands)
            conns = list(proxy.sink.closed)

    server_ports = set(ports) | set(upstreams)
    pdml = tmp_path / "capture.pdml"
    decode_as = [a for p in ports + upstreams for a in ("-d", f"tcp.port=={p},mongo")]
    with open(pdml, "wb") as out:
        subprocess.run(
            [tshark, "-r", capture.path, *decode_as, "-Y", "mongo", "-T", "pdml"],
            stdout=out,
            stderr=subprocess.PIPE,
            check=True,
            timeout=120,
        )
    pdus = parse_pdml(str(pdml), server_ports)
    assert pdus, "tshark decoded no mongo messages"

    # The streams on each side, as sequences of decoded messages.
    streams: dict[int, list[Pdu]] = defaultdict(list)
    for pdu in pdus:
        streams[pdu.stream].append(pdu)
    client_side = {s: msgs for s, msgs in streams.items() if msgs[0].server_port in ports}
    server_side = {s: msgs for s, msgs in streams.items() if msgs[0].server_port in upstreams}
    assert len(client_side) + len(server_side) == len(streams)

    # 1. Both sides of the proxy carry the same messages, connection by connection (paired by their first
    # message). A client closing mid-stream (pymongo's monitor) may leave one streamed reply that the server sent
    # but the proxy, already closing, never forwarded.
    assert len(client_side) == len(server_side)
    upstream_by_first = {msgs[0].key(): [m.key() for m in msgs] for msgs in server_side.values()}
    assert len(upstream_by_first) == len(server_side)
    for msgs in client_side.values():
        down = [m.key() for m in msgs]
        up = upstream_by_first[down[0]]
        assert up[: len(down)] == down
        extra = up[len(down) :]
        assert len(extra) <= 1 and all(not key[0] for key in extra), extra  # key[0]: to_server

    # 2. Every client-side message is one proxy event, and they agree field by field. A client may open a
    # connection and close it before sending a byte (pymongo's RTT monitor, when a short-lived client closes while
    # it connects): tshark has no mongo stream for it, and the proxy must have seen nothing on it either.
    silent = [c for c in conns if c.bytes_from_client == 0]
    assert silent and all(c.bytes_from_server == 0 for c in silent), silent  # the workload makes one
    assert not [e for e in events if any(e.connection is c for c in silent)]
    conns = [c for c in conns if c.bytes_from_client]
    by_port = {c.client_port: c for c in conns}
    assert sorted(by_port) == sorted(msgs[0].client_port for msgs in client_side.values()), (
        f"proxy connections {[(c.client_port, c.bytes_from_client, c.bytes_from_server) for c in conns]}"
    )
    seen_requests: set = set()
    seen_replies: set = set()
    checked = Counter()
    for msgs in client_side.values():
        conn = by_port[msgs[0].client_port]
        evs = [e for e in events if e.connection is conn]
        for m in msgs:
            if m.to_server:
                matching = [e for e in evs if e.request_id & 0xFFFFFFFF == m.request_id]
                assert matching, f"no event for request {m}"
                e = matching[0]
                seen_requests.add((conn.id, e.request_id))
                assert m.opcode == e.request_opcode and m.response_to == 0
                if m.original_opcode is not None:
                    assert m.original_opcode == e.request.opcode
                    checked["compressed request" if m.decoded else "zstd request (header only)"] += 1
                if not m.decoded:
                    continue
                if m.command is not None and e.request is not None and e.request.command is not None:
                    assert m.command == e.request.command, (m, e.op)
                    assert m.command == e.op
                    raw = m.getmore_collection if m.command == "getMore" else m.first_value
                    assert (raw or None) == e.request.collection, (m, e.request.collection)
                    attributed = raw if raw and m.command in COLLECTION_COMMANDS else ""
                    assert attributed == e.collection, (m, e.collection)
                    checked["command"] += 1
                if m.namespace is not None and m.opcode != mwire.OP_COMMAND and not m.namespace.endswith(".$cmd"):
                    assert m.namespace == e.request.namespace
                    db, _, coll = m.namespace.partition(".")
                    assert (db, coll) == (e.database, e.collection)
                    checked[f"legacy {mwire.OP_NAMES[m.opcode]}"] += 1
                if m.opcode == mwire.OP_COMMAND:
                    assert (m.command, m.namespace) == (e.op, e.database)
                    checked["OP_COMMAND"] += 1
            else:
                answered = [e for e in evs if e.reply is not None and e.reply_request_id & 0xFFFFFFFF == m.request_id]
                assert len(answered) == 1, f"reply {m} is {len(answered)} events"
                e = answered[0]
                seen_replies.add((conn.id, e.reply_request_id))
                assert m.opcode == e.reply_opcode
                previous = [
                    x.reply_request_id & 0xFFFFFFFF
                    for x in evs
                    if x.request_id == e.request_id and x.exhaust_index == e.exhaust_index - 1
                ]
                assert m.response_to == e.request_id & 0xFFFFFFFF or m.response_to in previous, (m, e)
                if e.exhaust_index:
                    checked["streamed reply"] += 1
                if m.original_opcode is not None:
                    checked["compressed reply"] += 1
    # ... and every event is a message tshark saw.
    assert {(e.connection.id, e.request_id) for e in events} == seen_requests
    assert {(e.connection.id, e.reply_request_id) for e in events if e.reply is not None} == seen_replies
    assert proxy.sink.unmatched == []
    assert [(d.direction, d.reason) for d in proxy.sink.decode_errors] in ([], [("reply", "truncated")])  # see 1.

    # The comparison covered every kind of message the workload sends.
    print("\ntshark cross-check:", dict(checked), f"(connections closed before a byte: {len(silent)})")
    assert checked["command"] >= 30 and checked["streamed reply"] >= 2
    assert checked["compressed request"] >= 6 and checked["compressed reply"] >= 9
    assert checked["zstd request (header only)"] >= 3
    for op in ("OP_INSERT", "OP_UPDATE", "OP_DELETE", "OP_GET_MORE", "OP_QUERY"):
        assert checked[f"legacy {op}"] == 1, op
    assert checked["OP_COMMAND"] == 1
    kinds = Counter((m.opcode, m.original_opcode) for m in pdus)
    for op in (
        mwire.OP_MSG,
        mwire.OP_QUERY,
        mwire.OP_REPLY,
        mwire.OP_INSERT,
        mwire.OP_UPDATE,
        mwire.OP_DELETE,
        mwire.OP_GET_MORE,
        mwire.OP_KILL_CURSORS,
        mwire.OP_COMMAND,
        mwire.OP_COMMANDREPLY,
    ):
        assert kinds[(op, None)] >= 2, mwire.OP_NAMES[op]  # each side of the proxy
    assert {c for (_, c) in [(m.opcode, m.compressor) for m in pdus] if c is not None} == {1, 2, 3}
    unack = [e for e in events if e.more_to_come_request and e.op == "insert"]
    assert len(unack) == 1 and unack[0].collection == "logs"
