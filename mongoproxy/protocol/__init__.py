"""Sans-io MongoDB wire protocol: opcodes, framing, the command table and the messages the proxy builds."""
