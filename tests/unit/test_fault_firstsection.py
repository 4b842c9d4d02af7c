"""Inflating a held OP_COMPRESSED request (protocol's decompressor) never goes past the size it claims."""

import zlib

import cramjam
import pytest
import zstandard

from mongoproxy.errors import DecodeError
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
    assert inflate(cid, packed, len(BODY), 1 << 20) == BODY
    with pytest.raises(DecodeError) as info:
        inflate(cid, packed, 1000, 1 << 20)  # a body that inflates past its claim is refused, not inflated whole
    assert info.value.reason == "bad_uncompressed_size"
    with pytest.raises(DecodeError):
        inflate(cid, packed, len(BODY), 50_000)  # over the message limit
    with pytest.raises(DecodeError):
        inflate(9, packed, len(BODY), 1 << 20)
