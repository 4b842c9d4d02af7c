"""Opcodes, OP_MSG flag bits, compressor ids and the 16-byte message header: the one declaration of each."""

from __future__ import annotations

import struct

OP_REPLY = 1
OP_UPDATE = 2001
OP_INSERT = 2002
OP_QUERY = 2004
OP_GET_MORE = 2005
OP_DELETE = 2006
OP_KILL_CURSORS = 2007
OP_COMMAND = 2010
OP_COMMANDREPLY = 2011
OP_COMPRESSED = 2012  # unwrapped by the framer; the scanner never sees it
OP_MSG = 2013

OPCODE_NAMES = {
    OP_REPLY: "OP_REPLY",
    OP_UPDATE: "OP_UPDATE",
    OP_INSERT: "OP_INSERT",
    OP_QUERY: "OP_QUERY",
    OP_GET_MORE: "OP_GET_MORE",
    OP_DELETE: "OP_DELETE",
    OP_KILL_CURSORS: "OP_KILL_CURSORS",
    OP_COMMAND: "OP_COMMAND",
    OP_COMMANDREPLY: "OP_COMMANDREPLY",
    OP_COMPRESSED: "OP_COMPRESSED",
    OP_MSG: "OP_MSG",
}
# Opcodes whose body the scanner understands (everything but OP_COMPRESSED).
BODY_OPCODES = frozenset(OPCODE_NAMES) - {OP_COMPRESSED}

# Opcodes a client sends (the others are replies).
REQUEST_OPCODES = frozenset(OPCODE_NAMES) - {OP_REPLY, OP_COMMANDREPLY}

# OP_MSG flagBits.
CHECKSUM_PRESENT = 1 << 0
MORE_TO_COME = 1 << 1
EXHAUST_ALLOWED = 1 << 16

COMPRESSOR_NAMES = {0: "noop", 1: "snappy", 2: "zlib", 3: "zstd"}

# messageLength, requestID, responseTo, opCode.
HEADER = struct.Struct("<iiii")
HEADER_SIZE = 16
# OP_COMPRESSED after its header: originalOpcode, uncompressedSize, compressorId.
COMPRESSED_PREFIX = struct.Struct("<iiB")
# What a server accepts (maxMessageSizeBytes); the default of --max-message-bytes.
DEFAULT_MAX_MESSAGE_BYTES = 48_000_000
