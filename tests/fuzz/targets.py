"""Every import of the code under fuzzing, in one place: re-point here when modules move.

The framer is in mongoproxy/protocol/ (issue 17); replay is the package mongoproxy/replay/, whose `load`
reads capture files and `load_bytes` one file's content from memory (the same reading code); the hello
rewriter, which mongoproxy/hellogate.py calls, is mongoproxy/protocol/hello.py.
The harnesses only use the names below; tests/fuzz/registry.py names the modules to instrument.
"""

from __future__ import annotations

from mongoproxy.errors import DecodeError, ReplayError
from mongoproxy.events import Connection, SinkBus
from mongoproxy.protocol.framing import DECODE_REASONS, FRAMING_REASONS, FrameScanner, Message
from mongoproxy.protocol.hello import HelloRewriteError
from mongoproxy.protocol.hello import make_swap as make_hello_swap
from mongoproxy.protocol.hello import rewrite_reply as rewrite_hello
from mongoproxy.protocol.opcodes import HEADER_SIZE
from mongoproxy.replay import load as replay_load
from mongoproxy.replay import load_bytes as replay_load_bytes
from mongoproxy.tracker import Tracker
from tests.support.collecting import CollectingSink

__all__ = [
    "DECODE_REASONS",
    "FRAMING_REASONS",
    "HEADER_SIZE",
    "CollectingSink",
    "Connection",
    "DecodeError",
    "FrameScanner",
    "HelloRewriteError",
    "Message",
    "ReplayError",
    "SinkBus",
    "Tracker",
    "make_hello_swap",
    "replay_load",
    "replay_load_bytes",
    "rewrite_hello",
]
