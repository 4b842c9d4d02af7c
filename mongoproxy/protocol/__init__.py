"""The MongoDB wire protocol, sans-io: opcodes and the header, the one framer, the one bounded decompressor,
the command-classification table and the builders of messages the proxy sends.

Nothing in this package imports asyncio, sockets or sinks: it is fed bytes and returns or reports what
they mean. Modules: opcodes (numbers, names, the 16-byte header), commands (which command is what),
compression (OP_COMPRESSED, bounded), framing (the incremental framer and the live tap's FrameScanner),
builders (error and write-error replies, OP_REPLY for OP_QUERY requests, the table of server error codes).
"""
