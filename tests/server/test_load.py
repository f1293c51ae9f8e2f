"""Load: rounds of 8 concurrent clients, mixed cold/warm images, against a real process.

Expectations: no 5xx; 429 only when the server is full (with 16 slots and 8 clients it never is,
so none); RSS flat across rounds (the cache is capped small here so it saturates and any growth
beyond it would be a leak).
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import random
import time

import httpx
import pytest

from tests.server.conftest import ServerProcess, image_bytes

CLIENTS = 8
REQUESTS = 60  # per client and round


def _run_clients(url: str, requests_per_client: int, cold_fraction: float) -> tuple[collections.Counter, list[httpx.Response]]:
    warm_images = [image_bytes(seed=9000 + i) for i in range(4)]

    def client(n: int) -> list[httpx.Response]:
        rng = random.Random(n)
        out = []
        with httpx.Client(base_url=url, timeout=60) as c:
            for i in range(requests_per_client):
                if rng.random() < cold_fraction:
                    data = image_bytes(seed=100_000 + n * 1000 + i, width=rng.choice([96, 160, 320]), height=120)
                else:
                    data = warm_images[rng.randrange(len(warm_images))]
                prompts = [rng.choice(["cat", "dog", "a red car", "person", "tree"])]
                out.append(
                    c.post("/segment", files={"image": ("a.jpg", data, "image/jpeg")},
                           data={"prompt": prompts, "score_threshold": "0.2", "mask_format": rng.choice(["rle", "none"])})
                )
        return out

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        responses = [r for batch in pool.map(client, range(CLIENTS)) for r in batch]
    return collections.Counter(r.status_code for r in responses), responses


def test_concurrent_mixed_load(server_bundle, tmp_path) -> None:
    """Rounds of 8 clients: only 200s (16 slots are never all taken by 8 clients), and RSS flat
    once the (small) cache is full: no per-request growth. The 3 x 8 x 200 run is
    ``python -m benchmarks.hostile`` (benchmarks/RESULTS.md)."""
    env = {"SAM3_QUEUE_SIZE": "16", "SAM3_CACHE_BYTES": str(4 * 1024 * 1024)}
    proc = ServerProcess(server_bundle, env, tmp_path)
    try:
        proc.wait_ready()
        _run_clients(proc.url, 5, 0.5)  # warm up allocator, caches, ORT arenas
        rounds = []
        started = time.perf_counter()
        for _ in range(3):
            statuses, responses = _run_clients(proc.url, REQUESTS, 0.3)
            rounds.append({"statuses": dict(statuses), "rss_mb": round(proc.rss_bytes() / 2**20, 1)})
        elapsed = time.perf_counter() - started
        info = httpx.get(f"{proc.url}/info").json()
        report = {"rounds": rounds, "seconds": round(elapsed, 2), "cache": info["cache"], "worker": info["worker"]}
        print("\nLOAD REPORT", json.dumps(report))
        (tmp_path / "load_report.json").write_text(json.dumps(report, indent=2))
        for r in rounds:
            assert r["statuses"] == {200: CLIENTS * REQUESTS}, r
        assert info["cache"]["hits"] > 0 and info["cache"]["evictions"] > 0  # both paths exercised
        assert info["cache"]["bytes"] <= 4 * 1024 * 1024
        # Flat once the cache is full: rounds 2 and 3 within allocator noise of round 1.
        rss = [r["rss_mb"] for r in rounds]
        assert max(rss) - rss[0] < 32, report
    finally:
        proc.stop()


def test_full_queue_gives_429_with_retry_after(server_bundle, tmp_path) -> None:
    proc = ServerProcess(server_bundle, {"SAM3_QUEUE_SIZE": "1"}, tmp_path)
    try:
        proc.wait_ready()
        statuses, responses = _run_clients(proc.url, 15, 1.0)
        assert not [s for s in statuses if s >= 500], statuses
        assert set(statuses) <= {200, 429}, statuses
        for r in responses:
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "queue_full" and int(r.headers["Retry-After"]) >= 1
        assert statuses[200] > 0
        metrics = httpx.get(f"{proc.url}/metrics").text
        if statuses.get(429):
            assert f'sam3_rejected_requests_total{{reason="queue_full"}} {float(statuses[429])}' in metrics
    finally:
        proc.stop()
