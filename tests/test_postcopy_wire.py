"""The post-copy records' payloads: PAGE_REQUEST and the page bitmaps (STATE owed, MISSING)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from livemig.migration.errors import ProtocolError
from livemig.migration.pageserver import (
    MAX_REQUEST,
    decode_request,
    encode_request,
    pack_bitmap,
    unpack_bitmap,
)

NPAGES = 1000


@given(st.lists(st.integers(0, NPAGES - 1), min_size=1, max_size=MAX_REQUEST))
def test_request_round_trip(pages: list[int]) -> None:
    got = decode_request(memoryview(encode_request(pages)), NPAGES)
    assert got.tolist() == sorted(set(pages))


@given(st.binary(max_size=200))
def test_request_decoder_takes_only_what_fits(data: bytes) -> None:
    try:
        idx = decode_request(memoryview(data), NPAGES)
    except ProtocolError:
        return
    assert len(data) % 8 == 0 and 0 < len(idx) and int(idx.max()) < NPAGES


def test_request_refuses_a_page_outside_ram_and_too_many() -> None:
    with pytest.raises(ProtocolError, match="names page"):
        decode_request(memoryview(encode_request([NPAGES])), NPAGES)
    with pytest.raises(ProtocolError):
        decode_request(memoryview(encode_request([0] * (MAX_REQUEST + 1))), NPAGES)


@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_bitmap_round_trip(bits: list[bool]) -> None:
    mask = np.array(bits, dtype=bool)
    assert (unpack_bitmap(pack_bitmap(mask), len(mask), "t") == mask).all()


@given(st.binary(max_size=300), st.integers(1, 2000))
def test_a_bitmap_that_does_not_decode_to_its_size_is_refused(data: bytes, npages: int
                                                              ) -> None:
    try:
        mask = unpack_bitmap(data, npages, "t")
    except ProtocolError as e:
        assert "does not fit" in str(e)
        return
    assert len(mask) == npages


def test_bitmaps_travel_small_and_a_wrong_size_is_refused() -> None:
    mask = np.zeros(1 << 18, dtype=bool)  # a GiB of pages, one run owed
    mask[1000:26600] = True
    packed = pack_bitmap(mask)
    assert len(packed) < 1024
    with pytest.raises(ProtocolError, match="does not fit"):
        unpack_bitmap(packed, len(mask) + 8, "t")
    with pytest.raises(ProtocolError, match="does not fit"):
        unpack_bitmap(packed[:-3], len(mask), "t")
