"""A tiny OTLP/HTTP endpoint that accepts every POST and discards it.

    python -m benchmarks.otlp_sink [--port P]

Prints "ready PORT" once listening. Answers 200 with an empty
ExportTraceServiceResponse (zero bytes), keeping connections alive, so the
proxy's exporter does real HTTP work without a collector's decoding cost.
"""

from __future__ import annotations

import argparse
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m benchmarks.otlp_sink`."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.otlp_sink", description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), _Handler)
    server.daemon_threads = True
    print("ready", server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
