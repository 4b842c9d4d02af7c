"""Inflating a held OP_COMPRESSED request never produces more than the size it claims."""

import zlib

import cramjam
import pytest
import zstandard

from mongoproxy.faults.firstsection import inflate

BODY = b"\x00" * 100_000


@pytest.mark.parametrize(
    ("cid", "packed"),
    [
        (2, zlib.compress(BODY)),
        (3, zstandard.ZstdCompressor().compress(BODY)),
        (1, bytes(cramjam.snappy.compress_raw(BODY))),
        (0, BODY),
    ],
)
def test_inflate_checks_the_claimed_size(cid, packed):
    assert inflate(cid, packed, len(BODY)) == BODY
    with pytest.raises(ValueError, match="uncompressedSize 1000|snappy length"):
        inflate(cid, packed, 1000)  # a body that inflates past its claim is refused, not inflated whole
    with pytest.raises(ValueError):
        inflate(9, packed, len(BODY))
