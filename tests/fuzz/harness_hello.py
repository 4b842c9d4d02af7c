"""The slot for the hello rewriter's harness: the rewriter does not exist yet.

When it lands, bind it in tests/fuzz/targets.py (`rewrite_hello`) and check here, for any hello reply bytes:
only DecodeError escapes, the output is a well-formed message whose length field matches its size, and
rewriting is idempotent. Until then the runner reports this harness as not available and runs nothing.
"""

from __future__ import annotations

from tests.fuzz.targets import rewrite_hello

AVAILABLE = rewrite_hello is not None


def test_one_input(data: bytes) -> None:
    """Nothing to fuzz until the rewriter exists."""
    raise RuntimeError("the hello rewriter does not exist yet: see tests/fuzz/targets.py")
