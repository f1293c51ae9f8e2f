"""Embedding caches: the reason a second prompt on the same image costs milliseconds.

An image embedding is the expensive part (~0.5-1 s on an Orin Nano) and large (~58 MB fp16,
~117 MB fp32), so :class:`EmbeddingCache` is an LRU bounded in **bytes**, not entries. When
several requests miss on the same key at once, one computes and the rest wait for its result
(single flight), so the encoder runs once. :class:`TextCache` is a small LRU of per-prompt
text embeddings keyed by (prompt, namespace); the server sets the namespace to the pipeline's
``text_encoder_key`` (text weights + tokenizer), so another text encoder never reuses entries.

Pure Python and thread-safe; no model is needed to test it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, TypeVar

V = TypeVar("V")


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    capacity_bytes: int
    in_flight: int

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)


class EmbeddingCache(Generic[V]):
    """Byte-bounded LRU with single-flight computation of misses.

    ``size_of`` returns an entry's size in bytes (``ImageEmbedding.nbytes``). An entry larger
    than the whole capacity is returned to its caller but not stored.
    """

    def __init__(self, capacity_bytes: int, size_of: Callable[[V], int]) -> None:
        self.capacity_bytes = int(capacity_bytes)
        self._size_of = size_of
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._in_flight: dict[Hashable, Future[V]] = {}
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    def get(self, key: Hashable) -> V | None:
        """The cached value (counted as a hit and made most recent), or None (not counted)."""
        with self._lock:
            item = self._entries.get(key)
            if item is None:
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return item[0]

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def get_or_compute(self, key: Hashable, compute: Callable[[], V]) -> tuple[V, bool]:
        """Return ``(value, hit)``; on a miss exactly one concurrent caller runs ``compute``.

        Waiters on an in-flight computation count as hits (they ran no encoder). If ``compute``
        raises, every waiter gets the exception and nothing is cached, so the next call retries.
        """
        with self._lock:
            item = self._entries.get(key)
            if item is not None:
                self._entries.move_to_end(key)
                self._hits += 1
                return item[0], True
            pending = self._in_flight.get(key)
            if pending is None:
                self._misses += 1
                pending = Future()
                self._in_flight[key] = pending
                leader = True
            else:
                self._hits += 1
                leader = False
        if not leader:
            return pending.result(), True
        try:
            value = compute()
        except BaseException as exc:
            with self._lock:
                del self._in_flight[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._in_flight[key]
            self._store(key, value)
        pending.set_result(value)
        return value, False

    def put(self, key: Hashable, value: V) -> None:
        with self._lock:
            self._store(key, value)

    def delete(self, key: Hashable) -> bool:
        with self._lock:
            item = self._entries.pop(key, None)
            if item is None:
                return False
            self._bytes -= item[1]
            return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                entries=len(self._entries),
                bytes=self._bytes,
                capacity_bytes=self.capacity_bytes,
                in_flight=len(self._in_flight),
            )

    def _store(self, key: Hashable, value: V) -> None:
        size = int(self._size_of(value))
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        if size > self.capacity_bytes:
            return  # would evict everything and still not fit
        while self._entries and self._bytes + size > self.capacity_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._bytes -= evicted
            self._evictions += 1
        self._entries[key] = (value, size)
        self._bytes += size


class TextCache(Generic[V]):
    """Entry-bounded LRU of per-prompt text embeddings, keyed by (prompt, namespace)."""

    def __init__(self, max_entries: int, namespace: str = "") -> None:
        self.max_entries = int(max_entries)
        self.namespace = namespace
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], V] = OrderedDict()
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    def get(self, prompt: str) -> V | None:
        key = (prompt, self.namespace)
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return value

    def put(self, prompt: str, value: V) -> None:
        if self.max_entries <= 0:
            return
        key = (prompt, self.namespace)
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
                self._evictions += 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "hits": self._hits,
                "misses": self._misses,
                "evictions": self._evictions,
                "entries": len(self._entries),
                "capacity_entries": self.max_entries,
            }
