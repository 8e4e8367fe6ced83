"""The raw-copy yardstick on a small size."""

from __future__ import annotations

import pytest

from livemig.bench.rawcopy import measure_raw_copy


def test_raw_copy_small() -> None:
    res = measure_raw_copy(8 << 20, repeats=2, chunk=256 << 10)
    assert len(res.seconds) == 2
    assert res.bytes_per_s > 1e6  # loopback is far faster than 1 MB/s
    assert res.best_bytes_per_s >= res.bytes_per_s
    d = res.to_dict()
    assert d["nbytes"] == 8 << 20 and d["repeats"] == 2


def test_raw_copy_odd_size_and_chunk_larger_than_size() -> None:
    res = measure_raw_copy(100_003, repeats=1, chunk=1 << 20)
    assert res.chunk == 100_003
    assert res.bytes_per_s > 0


def test_raw_copy_rejects_empty() -> None:
    with pytest.raises(ValueError):
        measure_raw_copy(0)
