"""The names the live path used before mongoproxy.protocol existed, re-exported from it unchanged.

Kept so that the benchmarks can measure an older checkout side by side (`tapcost.py --root`, the harness's
--baseline), which import `mongoproxy.wire`; nothing in the package imports it; new code imports mongoproxy.protocol.* directly.
Nothing is defined here.
"""

from __future__ import annotations

from mongoproxy.protocol.compression import SLICE as _INFLATE_SLICE  # noqa: F401
from mongoproxy.protocol.framing import (  # noqa: F401
    DECODE_REASONS,
    FRAMING_REASONS,
    SCANNER_REASONS,
    FrameScanner,
    Message,
    checksum_function,
)
from mongoproxy.protocol.opcodes import (  # noqa: F401
    BODY_OPCODES as BODY_OPS,
)
from mongoproxy.protocol.opcodes import (  # noqa: F401
    CHECKSUM_PRESENT,
    COMPRESSED_PREFIX,
    COMPRESSOR_NAMES,
    DEFAULT_MAX_MESSAGE_BYTES,
    EXHAUST_ALLOWED,
    HEADER,
    HEADER_SIZE,
    MORE_TO_COME,
    OP_COMMAND,
    OP_COMMANDREPLY,
    OP_COMPRESSED,
    OP_DELETE,
    OP_GET_MORE,
    OP_INSERT,
    OP_KILL_CURSORS,
    OP_MSG,
    OP_QUERY,
    OP_REPLY,
    OP_UPDATE,
)
from mongoproxy.protocol.opcodes import (  # noqa: F401
    OPCODE_NAMES as OP_NAMES,
)
