"""Embedding cache: byte bound, LRU order, single flight. Pure Python, no model."""

from __future__ import annotations

import threading
import time

import pytest

from server.cache import EmbeddingCache, TextCache


def _cache(capacity: int) -> EmbeddingCache[bytes]:
    return EmbeddingCache(capacity, size_of=len)


def test_bounded_in_bytes_and_evicts_least_recently_used() -> None:
    cache = _cache(100)
    cache.put("a", b"x" * 40)
    cache.put("b", b"x" * 40)
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", b"x" * 40)  # 120 > 100: evict b (least recent), keep a
    assert "b" not in cache and "a" in cache and "c" in cache
    stats = cache.stats()
    assert stats.bytes == 80 and stats.entries == 2 and stats.evictions == 1


def test_entry_larger_than_capacity_is_returned_but_not_stored() -> None:
    cache = _cache(10)
    value, hit = cache.get_or_compute("big", lambda: b"x" * 11)
    assert value == b"x" * 11 and not hit
    assert "big" not in cache and cache.stats().bytes == 0


def test_replacing_a_key_does_not_leak_bytes() -> None:
    cache = _cache(100)
    cache.put("a", b"x" * 30)
    cache.put("a", b"x" * 50)
    assert cache.stats().bytes == 50 and cache.stats().entries == 1


def test_hits_and_misses_counted() -> None:
    cache = _cache(100)
    calls = []
    for _ in range(3):
        cache.get_or_compute("k", lambda: calls.append(1) or b"v")
    stats = cache.stats()
    assert len(calls) == 1 and stats.misses == 1 and stats.hits == 2


def test_delete() -> None:
    cache = _cache(100)
    cache.put("a", b"12345")
    assert cache.delete("a") and not cache.delete("a")
    assert cache.stats().bytes == 0


def test_single_flight_runs_compute_once_for_concurrent_misses() -> None:
    cache = _cache(1000)
    started = threading.Event()
    release = threading.Event()
    calls: list[int] = []

    def compute() -> bytes:
        calls.append(1)
        started.set()
        release.wait(5)
        return b"embedding"

    results: list[tuple[bytes, bool]] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_compute("img", compute))) for _ in range(8)]
    threads[0].start()
    assert started.wait(5)
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 5
    while cache.stats().hits < 7 and time.monotonic() < deadline:  # all followers are waiting
        time.sleep(0.005)
    release.set()
    for t in threads:
        t.join(5)
    assert len(calls) == 1
    assert sorted(hit for _, hit in results) == [False] + [True] * 7
    assert all(value == b"embedding" for value, _ in results)
    assert cache.stats().in_flight == 0


def test_single_flight_failure_reaches_waiters_and_is_not_cached() -> None:
    cache = _cache(1000)
    gate = threading.Event()

    def failing() -> bytes:
        gate.wait(5)
        raise ValueError("encoder failed")

    errors: list[BaseException] = []

    def call() -> None:
        try:
            cache.get_or_compute("img", failing)
        except ValueError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    gate.set()
    for t in threads:
        t.join(5)
    assert len(errors) == 3
    assert "img" not in cache
    value, hit = cache.get_or_compute("img", lambda: b"ok")  # a later call retries
    assert value == b"ok" and not hit


def test_text_cache_is_keyed_by_namespace() -> None:
    # the server's namespace is the pipeline's text_encoder_key (text weights + tokenizer hash)
    cache: TextCache[str] = TextCache(2, namespace="text-a:tok-a")
    cache.put("cat", "emb-a")
    assert cache.get("cat") == "emb-a"
    cache.namespace = "text-a:tok-b"
    assert cache.get("cat") is None


def test_text_cache_lru_bound() -> None:
    cache: TextCache[str] = TextCache(2)
    cache.put("a", "1")
    cache.put("b", "2")
    cache.get("a")
    cache.put("c", "3")
    assert cache.get("b") is None and cache.get("a") == "1" and cache.get("c") == "3"
    assert cache.stats()["evictions"] == 1


@pytest.mark.parametrize("capacity", [0, 1])
def test_zero_capacity_caches_nothing(capacity: int) -> None:
    cache = _cache(capacity)
    cache.get_or_compute("a", lambda: b"xx")
    assert cache.stats().entries == 0
