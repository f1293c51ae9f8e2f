"""The HTTP API against a real uvicorn process: results, cache behaviour, probes, auth, shutdown."""

from __future__ import annotations

import base64
import concurrent.futures
import re
import signal
import threading
import time

import httpx
import numpy as np
import pytest

from engines.options import SegmentOptions
from engines.pipeline import Sam3Pipeline
from engines.postprocess import decode_mask, result_document
from engines.types import STAGES
from tests.server.conftest import ServerProcess, image_bytes

# uvicorn re-raises SIGTERM after its graceful shutdown, so a clean stop exits by that signal.
CLEAN_EXIT = (0, -signal.SIGTERM)
OPTIONS = {"score_threshold": 0.0, "mask_threshold": 0.5, "max_detections": 3}


def _segment(client: httpx.Client, data: bytes, prompts: list[str], **options) -> httpx.Response:
    fields: dict[str, object] = {"prompt": list(prompts), **{k: str(v) for k, v in options.items()}}
    return client.post("/segment", files={"image": ("img.jpg", data, "image/jpeg")}, data=fields)


def _stage_calls(client: httpx.Client) -> dict[str, int]:
    return client.get("/info").json()["stage_calls"]


def test_segment_equals_pipeline_segment(client: httpx.Client, server_bundle) -> None:
    data = image_bytes(seed=101)
    prompts = ["a cat", "two dogs"]
    response = _segment(client, data, prompts, **OPTIONS, mask_format="rle")
    assert response.status_code == 200, response.text
    body = response.json()

    with Sam3Pipeline.from_bundle(server_bundle, "onnxruntime") as pipeline:
        expected = pipeline.segment(data, prompts, SegmentOptions(**OPTIONS))
    doc = result_document(expected.image_size, expected.results, "rle")

    # The id is keyed (server secret + namespace): 64 hex digits, not the bytes' plain sha256.
    assert re.fullmatch(r"[0-9a-f]{64}", body["image_id"]) and body["image_id"] != expected.image_id
    assert body["image_size"] == {"width": 160, "height": 120} == doc["image_size"]
    assert [r["prompt"] for r in body["results"]] == prompts
    assert sum(len(r["detections"]) for r in body["results"]) > 0  # score_threshold 0: something to compare
    for got, want in zip(body["results"], doc["results"], strict=True):
        assert len(got["detections"]) == len(want["detections"])
        for g, w in zip(got["detections"], want["detections"]):
            assert g["score"] == pytest.approx(w["score"], abs=1e-5)
            np.testing.assert_allclose(g["box"], w["box"], atol=1e-3)
            assert g["mask"]["size"] == [120, 160]
            a, b = decode_mask(g["mask"]), decode_mask(w["mask"])
            assert (a != b).mean() < 1e-3
    assert set(body["timings_ms"]) == {"queue", *STAGES, "total"}
    assert body["model"] == {"name": "sam3-tiny", "backend": "onnxruntime", "precision": "fp32"}
    assert body["cache_hit"] is False


def test_second_prompt_hits_cache_and_runs_no_image_encoder(client: httpx.Client) -> None:
    data = image_bytes(seed=202)
    first = _segment(client, data, ["cat"], **OPTIONS)
    assert first.status_code == 200 and first.json()["cache_hit"] is False
    before = _stage_calls(client)
    second = _segment(client, data, ["dog"], **OPTIONS)
    assert second.status_code == 200 and second.json()["cache_hit"] is True
    by_id = client.post("/segment", json={"image_id": first.json()["image_id"], "prompts": ["bird"], **OPTIONS})
    assert by_id.status_code == 200 and by_id.json()["cache_hit"] is True
    after = _stage_calls(client)
    assert after["image_encoder"] == before["image_encoder"]  # no encoder run for either
    assert after["decoder"] == before["decoder"] + 2
    metrics = client.get("/metrics").text
    assert re.search(r'^sam3_pipeline_stage_calls_total\{stage="image_encoder"\} ' + f"{after['image_encoder']}", metrics, re.M)


def test_json_base64_and_multipart_agree(client: httpx.Client) -> None:
    data = image_bytes(seed=303, fmt="PNG")
    multipart = _segment(client, data, ["cat"], **OPTIONS).json()
    as_json = client.post(
        "/segment", json={"image": base64.b64encode(data).decode(), "prompts": ["cat"], **OPTIONS}
    ).json()
    assert as_json["image_id"] == multipart["image_id"] and as_json["results"] == multipart["results"]


@pytest.mark.parametrize("fmt", ["rle", "png", "polygon", "none"])
def test_mask_formats(client: httpx.Client, fmt: str) -> None:
    body = _segment(client, image_bytes(seed=404), ["cat"], **OPTIONS, mask_format=fmt).json()
    det = body["results"][0]["detections"][0]
    if fmt == "none":
        assert det["mask"] is None
    else:
        assert det["mask"]["format"] == fmt and det["mask"]["size"] == [120, 160]


def test_embed_then_segment_by_id_then_delete(client: httpx.Client) -> None:
    data = image_bytes(seed=505)
    embedded = client.post("/embed", files={"image": ("x.png", data, "image/png")})
    assert embedded.status_code == 200, embedded.text
    body = embedded.json()
    assert body["cached"] is False and body["image_size"] == {"width": 160, "height": 120}
    assert client.post("/embed", json={"image": base64.b64encode(data).decode()}).json()["cached"] is True
    ok = client.post("/segment", json={"image_id": body["image_id"], "prompts": ["cat"]})
    assert ok.status_code == 200 and ok.json()["cache_hit"] is True
    assert client.delete(f"/embeddings/{body['image_id']}").status_code == 200
    gone = client.post("/segment", json={"image_id": body["image_id"], "prompts": ["cat"]})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "image_not_cached"
    assert client.delete(f"/embeddings/{body['image_id']}").status_code == 404


def test_probes_info_metrics(client: httpx.Client) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/readyz").json() == {"state": "ready"}
    info = client.get("/info").json()
    assert info["manifest"]["name"] == "sam3-tiny" and info["state"] == "ready"
    assert {"hits", "misses", "bytes", "evictions", "entries"} <= set(info["cache"])
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("sam3_request_duration_seconds_bucket", "sam3_stage_duration_seconds_bucket", "sam3_queue_depth",
                 "sam3_image_cache_hits_total", "sam3_image_cache_misses_total", "sam3_image_cache_bytes",
                 "sam3_image_cache_evictions_total", 'sam3_state{state="ready"} 1.0'):
        assert name in metrics.text, name
    assert 'route="/segment"' in metrics.text
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text


def test_concurrent_misses_on_one_image_encode_once(client: httpx.Client) -> None:
    data = image_bytes(seed=606)
    before = _stage_calls(client)["image_encoder"]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda i: _segment(client, data, [f"thing {i}"], **OPTIONS), range(6)))
    assert all(r.status_code == 200 for r in responses)
    assert sorted(r.json()["cache_hit"] for r in responses) == [False] + [True] * 5
    assert _stage_calls(client)["image_encoder"] == before + 1


def test_cache_eviction_gives_image_not_cached(server_bundle, tmp_path) -> None:
    # Room for about one tiny embedding (172 kB): the second image evicts the first.
    proc = ServerProcess(server_bundle, {"SAM3_CACHE_BYTES": "200000"}, tmp_path)
    try:
        proc.wait_ready()
        with httpx.Client(base_url=proc.url, timeout=30) as c:
            first = _segment(c, image_bytes(seed=1), ["cat"]).json()["image_id"]
            _segment(c, image_bytes(seed=2), ["cat"])
            r = c.post("/segment", json={"image_id": first, "prompts": ["cat"]})
            assert r.status_code == 404 and r.json()["error"]["code"] == "image_not_cached"
            assert c.get("/info").json()["cache"]["evictions"] >= 1
    finally:
        assert proc.stop() in CLEAN_EXIT


def test_api_key(server_bundle, tmp_path) -> None:
    proc = ServerProcess(server_bundle, {"SAM3_API_KEY": "s3cret"}, tmp_path)
    try:
        proc.wait_ready()
        with httpx.Client(base_url=proc.url, timeout=30) as c:
            data = image_bytes(seed=7)
            for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": "s3cret-but-longer"}):
                r = c.post("/segment", files={"image": ("a.jpg", data, "image/jpeg")}, data={"prompt": "cat"}, headers=headers)
                assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
                assert c.get("/info", headers=headers).status_code == 401
            ok = c.post("/segment", files={"image": ("a.jpg", data, "image/jpeg")}, data={"prompt": "cat"},
                        headers={"X-API-Key": "s3cret"})
            assert ok.status_code == 200
            assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
    finally:
        proc.stop()


def test_a_broken_bundle_stops_the_server_with_one_line(tmp_path) -> None:
    """Fail fast: a bundle that cannot load is exit code 2 and one line naming the file, not a
    server that stays "failed" (the corrupt-bundle cases: tests/server/test_fail_fast.py)."""
    broken = tmp_path / "bundle"
    broken.mkdir()
    (broken / "manifest.json").write_text("{}")
    proc = ServerProcess(broken, {}, tmp_path)
    try:
        assert proc.proc.wait(timeout=60) == 2
    finally:
        proc.stop()
    lines = [line for line in proc.log().splitlines() if line.strip()]
    assert len(lines) == 1 and "manifest.json" in lines[0] and "schema_version" in lines[0], lines
    assert "Traceback" not in proc.log()


def test_sigterm_drains_in_flight_requests(server_bundle, tmp_path) -> None:
    proc = ServerProcess(server_bundle, {"SAM3_QUEUE_SIZE": "64"}, tmp_path)
    proc.wait_ready()
    images = [image_bytes(seed=1000 + i, width=1200, height=900) for i in range(8)]
    results: list[int] = []
    failures: list[BaseException] = []
    started = threading.Barrier(9)

    def call(i: int) -> None:
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            started.wait()
            try:
                results.append(_segment(c, images[i], [f"p{i}"]).status_code)
            except httpx.HTTPError as exc:
                failures.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    started.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # wait until the worker has work in flight
        if httpx.get(f"{proc.url}/info").json()["queue"]["depth"] > 0:
            break
        time.sleep(0.005)
    else:
        pytest.fail("no request reached the worker")
    code = proc.stop()
    for t in threads:
        t.join(60)
    assert code in CLEAN_EXIT, proc.log()
    # Requests the server had accepted completed (200); only ones that had not connected yet may
    # be refused. A request cut off mid-flight would show up as a read/protocol error.
    assert results and all(status == 200 for status in results), results
    assert all(isinstance(f, httpx.ConnectError) for f in failures), failures


def test_fp16_cache_halves_embedding_bytes(server_bundle, tmp_path) -> None:
    """SAM3_CACHE_DTYPE=float16 stores embeddings in half the bytes; cold and warm agree."""
    proc = ServerProcess(server_bundle, {"SAM3_CACHE_DTYPE": "float16"}, tmp_path)
    try:
        proc.wait_ready()
        with httpx.Client(base_url=proc.url, timeout=30) as c:
            data = image_bytes(seed=7)
            cold = _segment(c, data, ["cat"]).json()
            warm = _segment(c, data, ["cat"]).json()
            assert warm["cache_hit"] and cold["results"] == warm["results"]
            cache = c.get("/info").json()["cache"]
            assert cache["dtype"] == "float16" and cache["entries"] == 1
        from engines.bundle import Bundle

        image = Bundle(server_bundle).manifest.part("image_encoder")
        fp32_bytes = sum(4 * int(np.prod(t.concrete_shape(1))) for t in image.outputs)
        assert cache["bytes"] == fp32_bytes // 2
    finally:
        assert proc.stop() in CLEAN_EXIT
