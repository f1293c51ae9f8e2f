"""Sam3Client against a real server process (tiny bundle): results, masks, cache, errors."""

from __future__ import annotations

import hashlib
import socket
import time

import numpy as np
import pytest

from clients import ApiError, RateLimited, RequestTimeout, Sam3Client, ServerUnreachable
from engines.postprocess import decode_mask as engine_decode_mask
from tests.clients.stub import rate_limiting_stub
from tests.server.conftest import image_bytes

# Random weights: at the default 0.5 threshold the tiny model may keep nothing. Threshold 0
# keeps every query, so masks and boxes are actually exercised.
ALL = {"score_threshold": 0.0, "max_detections": 3}


@pytest.fixture()
def client(live_server):
    with Sam3Client(live_server.url, timeout=60) as c:
        yield c


def test_segment_returns_typed_results_with_decodable_masks(client) -> None:
    data = image_bytes(160, 120, seed=101)
    response = client.segment(data, ["a cat", "a dog"], **ALL)
    # A keyed hash of the bytes (server/image_ids.py): 64 hex digits, not their plain sha256.
    assert len(response.image_id) == 64 and response.image_id != hashlib.sha256(data).hexdigest()
    assert response.image_size == (160, 120)
    assert [r.prompt for r in response.results] == ["a cat", "a dog"]
    assert response.model["backend"] == "onnxruntime"
    assert response.timings_ms["total"] > 0
    for result in response.results:
        assert len(result.detections) == 3
        scores = [d.score for d in result.detections]
        assert scores == sorted(scores, reverse=True)
        for det in result.detections:
            assert det.mask is not None and det.mask.size == (120, 160)
            mask = det.mask.array
            assert mask.dtype == bool and mask.shape == (120, 160)
            # the same pixels the server encoded (engines' own decoder is the ground truth)
            assert np.array_equal(mask, engine_decode_mask(det.mask.data))
            assert det.mask.area == int(mask.sum())


@pytest.mark.parametrize("fmt", ["png", "polygon"])
def test_png_and_polygon_masks_match_rle(client, fmt: str) -> None:
    data = image_bytes(96, 80, seed=102)
    rle = client.segment(data, "a cat", **ALL)
    other = client.segment(data, "a cat", mask_format=fmt, **ALL)
    for a, b in zip(rle.results[0].detections, other.results[0].detections):
        assert b.mask is not None and b.mask.format == fmt
        if fmt == "png":  # lossless
            assert np.array_equal(a.mask.array, b.mask.array)
        else:  # outer contours (holes close, 1-2 px specks dropped by the encoder): same fill as engines'
            assert b.mask.array.shape == a.mask.array.shape
            assert np.array_equal(b.mask.array, engine_decode_mask(b.mask.data))
            assert b.mask.array.any() == a.mask.array.any()


def test_mask_format_none_has_no_masks(client) -> None:
    response = client.segment(image_bytes(64, 64, seed=103), "a cat", mask_format="none", **ALL)
    assert response.results[0].detections and all(d.mask is None for d in response.results[0].detections)


def test_segment_cached_and_embed_reuse_the_embedding(client, live_server) -> None:
    data = image_bytes(128, 96, seed=104)
    embedded = client.embed(data)
    assert embedded.image_id != hashlib.sha256(data).hexdigest() and not embedded.cached
    assert client.embed(data).cached
    before = client.info()["stage_calls"].get("image_encoder", 0)
    cached = client.segment_cached(embedded.image_id, ["a cat"], **ALL)
    assert cached.cache_hit and cached.image_size == (128, 96)
    assert client.info()["stage_calls"].get("image_encoder", 0) == before  # no encoder run
    uploaded = client.segment(data, ["a cat"], **ALL)
    assert uploaded.cache_hit
    assert [d.box for d in uploaded.results[0].detections] == [d.box for d in cached.results[0].detections]


def test_numpy_and_path_inputs(client, tmp_path) -> None:
    pixels = (np.random.default_rng(5).random((40, 50, 3)) * 255).astype(np.uint8)
    assert client.segment(pixels, "a cat", **ALL).image_size == (50, 40)
    path = tmp_path / "photo.jpg"
    path.write_bytes(image_bytes(70, 30, seed=105))
    assert client.embed(path).image_size == (70, 30)


def test_health_reports_ready(client) -> None:
    health = client.health()
    assert health.status == "ok" and health.ready and health.state == "ready"


def test_4xx_error_bodies_are_surfaced(client) -> None:
    with pytest.raises(ApiError) as info:
        client.segment_cached("f" * 64, ["a cat"])
    assert info.value.status == 404 and info.value.code == "image_not_cached"
    assert "not cached" in str(info.value)
    with pytest.raises(ApiError) as info:
        client.segment(image_bytes(32, 32, seed=106), [f"p{i}" for i in range(9)])  # server max is 8
    assert info.value.status == 422 and info.value.code == "too_many_prompts"
    with pytest.raises(ApiError) as info:
        client.segment(b"not an image at all", ["a cat"])
    assert 400 <= info.value.status < 500 and info.value.message


def test_unknown_option_is_refused_before_any_request(client) -> None:
    with pytest.raises(TypeError, match="unknown segment option"):
        client.segment(image_bytes(32, 32), "a cat", score_treshold=0.1)


def test_connection_refused_is_typed() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with (
        Sam3Client(f"http://127.0.0.1:{port}", timeout=5) as client,
        pytest.raises(ServerUnreachable, match="connection refused"),
    ):
        client.health()


def test_timeout_is_typed(live_server) -> None:
    with (
        Sam3Client(live_server.url, timeout=0.002, retries=0) as client,
        pytest.raises(RequestTimeout, match="timeout"),
    ):
        client.segment(image_bytes(320, 240, seed=107), ["a cat", "a dog"])


def test_429_retry_honours_retry_after() -> None:
    with rate_limiting_stub(fail_first=1, retry_after="1") as (url, stub), Sam3Client(url, retries=2) as client:
        started = time.monotonic()
        response = client.segment(b"\x89PNG\r\n\x1a\n....", "a cat")
        elapsed = time.monotonic() - started
    assert stub.requests == 2
    assert elapsed >= 1.0  # waited the server's Retry-After before the second attempt
    assert response.results[0].detections[0].mask.array[:2, :2].all()


def test_429_retries_are_bounded_and_capped() -> None:
    waits: list[float] = []
    with (
        rate_limiting_stub(fail_first=100, retry_after="120") as (url, stub),
        Sam3Client(url, retries=2, max_retry_wait_s=0.25, sleep=waits.append) as client,
        pytest.raises(RateLimited) as info,
    ):
        client.segment(b"\xff\xd8\xff....", "a cat")
    assert stub.requests == 3 and waits == [0.25, 0.25]
    assert info.value.status == 429 and info.value.code == "queue_full" and info.value.retry_after_s == 120


def test_429_without_retry_after_backs_off_exponentially() -> None:
    waits: list[float] = []
    with (
        rate_limiting_stub(fail_first=2, retry_after=None) as (url, stub),
        Sam3Client(url, retries=3, sleep=waits.append) as client,
    ):
        client.segment(b"\xff\xd8\xff....", "a cat")
    assert stub.requests == 3 and waits == [0.5, 1.0]
