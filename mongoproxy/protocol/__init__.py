"""The MongoDB wire protocol, sans-io."""
