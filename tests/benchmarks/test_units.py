"""Pure pieces of the benchmarks: percentiles, the cold-request byte trick, the schedule."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from benchmarks.http import is_cold, is_loopback, unique_variant
from benchmarks.pipeline import synthetic_jpeg
from benchmarks.stats import summarize


def test_summarize_matches_numpy_and_reports_fps() -> None:
    samples = [10.0, 20.0, 30.0, 40.0, 100.0]
    out = summarize(samples, items_per_sample=2)
    assert out["n"] == 5 and out["p50"] == 30.0 and out["min"] == 10.0 and out["max"] == 100.0
    assert out["p90"] == pytest.approx(np.percentile(samples, 90)) and out["mean"] == 40.0
    assert out["fps"] == pytest.approx(2 * 1000 / 40.0)
    with pytest.raises(ValueError):
        summarize([])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_unique_variant_changes_the_hash_not_the_pixels(fmt: str) -> None:
    jpeg = synthetic_jpeg(3, (64, 48))
    if fmt == "PNG":
        buf = io.BytesIO()
        Image.open(io.BytesIO(jpeg)).save(buf, format="PNG")
        data = buf.getvalue()
    else:
        data = jpeg
    variants = [unique_variant(data, i) for i in range(3)]
    assert len({hashlib.sha256(v).hexdigest() for v in [data, *variants]}) == 4
    original = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    for v in variants:
        img = Image.open(io.BytesIO(v))
        img.load()  # PNG CRCs are verified while loading
        assert np.array_equal(np.asarray(img.convert("RGB")), original)


def test_cold_schedule_is_evenly_spread() -> None:
    assert sum(is_cold(i, 0.25) for i in range(100)) == 25
    assert [is_cold(i, 0.5) for i in range(4)] == [False, True, False, True]
    assert not any(is_cold(i, 0.0) for i in range(10)) and all(is_cold(i, 1.0) for i in range(10))


def test_loopback_check() -> None:
    assert is_loopback("http://127.0.0.1:8000") and is_loopback("http://localhost:1") and is_loopback("http://[::1]:8")
    assert not is_loopback("http://192.168.1.5:8000") and not is_loopback("http://example.com")
