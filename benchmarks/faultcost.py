"""What fault injection costs the data path per small round trip, in process, without sockets.

    python benchmarks/faultcost.py [--pairs N] [--repeat R]

Drives a real server.ClientSide/UpstreamSide pair (stub transports whose
write does nothing) with N find-by-_id requests and their replies, through
the tap and the metrics sink, in four set-ups interleaved R times:
  off            no fault engine (the proxy as before fault injection)
  zero-rules     --allow-faults, no rule
  other-client   one rule for a client range this connection is not in (the connection is not gated)
  gated-nomatch  one rule this connection could match (op=insert), so each find is held until its first
                 section is read, decided on and forwarded
Prints one JSON object: best-of-R CPU µs (thread time) per round trip for each, and each one's difference to `off`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.tapcost import build_pair  # noqa: E402


class StubTransport:
    """Enough of an asyncio transport for the data path; writes go nowhere."""

    def __init__(self, peer: tuple, sock: tuple) -> None:
        self.extra = {"peername": peer, "sockname": sock}
        self.written = 0

    def get_extra_info(self, name: str, default=None):
        return self.extra.get(name, default)

    def write(self, data) -> None:
        self.written += 1

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def set_write_buffer_limits(self, high=None, low=None) -> None: ...
    def is_closing(self) -> bool:
        return False

    def close(self) -> None: ...
    def abort(self) -> None: ...
    def can_write_eof(self) -> bool:
        return False


def wire_pair(proxy, engine):
    """A connected ClientSide/UpstreamSide pair, set up the way ClientSide._connect does it."""
    from mongoproxy import server

    client = server.ClientSide(proxy, proxy.config.proxy[0])
    client.connection_made(StubTransport(("127.0.0.1", 40000), ("127.0.0.1", 27017)))
    client._connecting.cancel()
    upstream = server.UpstreamSide(client)
    upstream.connection_made(StubTransport(("127.0.0.1", 27018), ("127.0.0.1", 50000)))
    client.upstream = upstream
    client._write_upstream = upstream.transport.write
    if engine is not None and engine.active:
        from mongoproxy.faults import gate

        gate.install(engine, client)
    return client, upstream


async def measure(pairs: int, repeat: int) -> dict:
    import struct

    from prometheus_client import CollectorRegistry

    from mongoproxy import config as config_mod
    from mongoproxy.events import SinkBus
    from mongoproxy.faults import FaultEngine
    from mongoproxy.server import Proxy
    from mongoproxy.sinks.metrics import MetricsSink

    req, rep = build_pair()
    reqs, reps = [], []
    for i in range(pairs):
        r = bytearray(req)
        struct.pack_into("<i", r, 4, i + 1)
        reqs.append(bytes(r))
        p = bytearray(rep)
        struct.pack_into("<ii", p, 4, 1_000_000 + i, i + 1)
        reps.append(bytes(p))

    def engine_for(variant: str):
        if variant == "off":
            return None
        engine = FaultEngine(True)
        if variant == "other-client":
            engine.add_raw({"name": "elsewhere", "client": "10.0.0.0/8", "action": "close"})
        elif variant == "gated-nomatch":
            engine.add_raw({"name": "inserts", "op": "insert", "action": "close"})
        return engine

    cfg = config_mod.build({"proxy": ["0:127.0.0.1:27018"], "admin_port": "0"}, env={})
    variants = ("off", "zero-rules", "other-client", "gated-nomatch")
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(repeat):
        for variant in variants:
            proxy = Proxy(cfg, SinkBus([MetricsSink(CollectorRegistry())]))
            engine = engine_for(variant)
            proxy.faults = engine
            client, upstream = wire_pair(proxy, engine)
            gated = client.fault_gate is not None
            if gated != (variant == "gated-nomatch"):
                raise RuntimeError(f"{variant}: gated={gated}")
            send, answer = client.data_received, upstream.data_received
            t0 = time.thread_time_ns()
            for i in range(pairs):
                send(reqs[i])
                answer(reps[i])
            best[variant] = min(best[variant], (time.thread_time_ns() - t0) / pairs / 1000)
            if client.tracker.in_flight or upstream.transport.written != pairs and not gated:
                raise RuntimeError(f"{variant}: not every pair went through")
            client.close()
    out = {f"{v}_us": round(best[v], 3) for v in variants}
    out.update({f"{v}_added_us": round(best[v] - best["off"], 3) for v in variants if v != "off"})
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the JSON result."""
    ap = argparse.ArgumentParser(prog="benchmarks/faultcost.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    print(json.dumps(asyncio.run(measure(args.pairs, args.repeat))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
