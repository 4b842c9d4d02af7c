"""Every import of the code under fuzzing, in one place: re-point here when modules move.

The framer is in mongoproxy/protocol/ (issue 17); replay is the package mongoproxy/replay/, whose `load`
reads capture files. The harnesses only use the names below; tests/fuzz/registry.py names the modules to
instrument.
"""

from __future__ import annotations

from mongoproxy.errors import DecodeError, ReplayError
from mongoproxy.events import Connection, SinkBus
from mongoproxy.protocol.framing import DECODE_REASONS, FRAMING_REASONS, FrameScanner, Message
from mongoproxy.protocol.opcodes import HEADER_SIZE
from mongoproxy.replay import load as replay_load
from mongoproxy.tracker import Tracker
from tests.support.collecting import CollectingSink

# The hello rewriter does not exist yet. When it lands, bind its entry point here (e.g. `rewrite_hello`)
# and fill in tests/fuzz/harness_hello.py; until then that harness reports itself as not available.
rewrite_hello = None

__all__ = [
    "DECODE_REASONS",
    "FRAMING_REASONS",
    "HEADER_SIZE",
    "CollectingSink",
    "Connection",
    "DecodeError",
    "FrameScanner",
    "Message",
    "ReplayError",
    "SinkBus",
    "Tracker",
    "replay_load",
    "rewrite_hello",
]
