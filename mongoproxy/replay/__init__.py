"""`mongoproxy replay`: replay recorded MongoDB traffic against another server and compare.

Input is the proxy's pcapng recordings (`run --record DIR`) or pcap/pcapng
from tcpdump, read with dpkt. TCP is reassembled by sequence number;
retransmissions are dropped, and a connection with a gap is skipped with a
warning. Each recorded client connection is replayed on a pinned connection of
its own, in its recorded order, at the recorded relative times (`--speed`), or
as fast as possible (`--max-speed`). Invariants of the rewrites:
- Cursor ids are remapped in getMore and killCursors; a getMore waits for the
  command that opened its cursor, on whatever connection that ran.
- Every recorded lsid maps to one fresh session id, so retryable writes are
  not answered from an old session's cache; txnNumber is kept.
- $clusterTime, afterClusterTime/atClusterTime, handshake (hello/isMaster),
  auth and endSessions are not replayed; pymongo authenticates with the
  target URI's own credentials and gossips the target's cluster time.
Bad input (files, filters, target) raises ReplayError/ConfigError: one line,
non-zero exit. The file format is documented in docs/capture-replay.md.

Modules, in the order data flows: reader (packets, TCP, framing), extract (operations), model (the data),
filters, rewrite (cursor ids, lsids), target (pinned pymongo clients), runner (schedule), report, plot, cli.
"""

from mongoproxy.replay.cli import add_parser, main

# Capture files (or one file's bytes) to a Workload: what other code (fuzzing, tools) reads.
from mongoproxy.replay.extract import load, load_bytes

__all__ = ["add_parser", "load", "load_bytes", "main"]
