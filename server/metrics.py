"""Prometheus metrics, one registry per app (so tests can build several apps in one process).

Request and stage latencies are histograms observed as they happen; cache, queue and
pipeline-counter values are read at scrape time by a collector, so there is one source of
truth for each number (the cache's own stats) instead of two counters that can drift.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Seconds: from a cache-hit decode on a desktop CPU (ms) to a cold Orin Nano encode (~1 s+).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.request_seconds = Histogram(
            "sam3_request_duration_seconds",
            "HTTP request latency by route template, method and status.",
            ("route", "method", "status"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "sam3_stage_duration_seconds",
            "Per-stage latency of /segment (queue, image_encoder, text_encoder, geometry_encoder, decoder, postprocess, total).",
            ("stage",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rejected = Counter(
            "sam3_rejected_requests_total",
            "Requests refused or cut short: queue_full (429), deadline (504), body_timeout (408), client_closed (499).",
            ("reason",),
            registry=self.registry,
        )

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage=stage).observe(max(0.0, seconds))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.request_seconds.labels(route=route, method=method, status=str(status)).observe(seconds)

    def add_state_collector(self, read: Callable[[], dict[str, Any]]) -> None:
        self.registry.register(_StateCollector(read))


class _StateCollector(Collector):
    """Reads queue depth, cache stats, worker state and pipeline stage counters at scrape time."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        return []  # values appear only once the app exists; no up-front description needed

    def collect(self) -> Iterable[Metric]:
        snap = self._read()
        yield _gauge("sam3_queue_depth", "Jobs waiting for or running on the inference worker.", snap["queue_depth"])
        yield _gauge("sam3_queue_capacity", "Bound of the inference queue.", snap["queue_capacity"])
        admission = snap.get("admission")
        if admission:
            yield _gauge("sam3_requests_in_progress", "Admitted requests (SAM3_QUEUE_SIZE bounds them).",
                         admission["in_flight"])
            yield _gauge("sam3_decodes_in_progress", "Decoded images alive (SAM3_DECODE_CONCURRENCY bounds them).",
                         admission["decoding"])
        state = GaugeMetricFamily("sam3_state", "Server state (1 for the current one).", labels=["state"])
        for name in snap["states"]:
            state.add_metric([name], 1.0 if name == snap["state"] else 0.0)
        yield state
        cache = snap["image_cache"]
        yield _counter("sam3_image_cache_hits", "Image-embedding cache hits.", cache["hits"])
        yield _counter("sam3_image_cache_misses", "Image-embedding cache misses (encoder runs).", cache["misses"])
        yield _counter("sam3_image_cache_evictions", "Image embeddings evicted for space.", cache["evictions"])
        yield _gauge("sam3_image_cache_bytes", "Bytes held by the image-embedding cache.", cache["bytes"])
        yield _gauge("sam3_image_cache_capacity_bytes", "Byte bound of the image cache.", cache["capacity_bytes"])
        yield _gauge("sam3_image_cache_entries", "Images in the cache.", cache["entries"])
        text = snap["text_cache"]
        yield _counter("sam3_text_cache_hits", "Text-embedding cache hits.", text["hits"])
        yield _counter("sam3_text_cache_misses", "Text-embedding cache misses.", text["misses"])
        yield _gauge("sam3_text_cache_entries", "Prompts in the text cache.", text["entries"])
        yield from _stream_metrics(snap.get("streams", []))
        calls = CounterMetricFamily(
            "sam3_pipeline_stage_calls", "Pipeline stage invocations (engine runs).", labels=["stage"]
        )
        for stage, count in sorted(snap["stage_calls"].items()):
            calls.add_metric([str(stage)], float(count))
        yield calls


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=float(value))


def _stream_metrics(streams: list[dict[str, Any]]) -> Iterable[Metric]:
    """Per live stream (label ``stream``): processed FPS, frames processed and dropped, latency,
    tracks alive. Finished streams drop out, so the label set stays bounded."""
    live = [s for s in streams if s["state"] in ("starting", "running")]
    fps = GaugeMetricFamily("sam3_stream_processed_fps", "Frames processed per second (last 5 s).", labels=["stream"])
    processed = CounterMetricFamily("sam3_stream_frames_processed", "Frames segmented and tracked.", labels=["stream"])
    dropped = CounterMetricFamily("sam3_stream_frames_dropped", "Decoded frames replaced before processing.",
                                  labels=["stream"])
    latency = GaugeMetricFamily("sam3_stream_latency_ms", "Frame decoded -> event ready, median of the last 100.",
                                labels=["stream"])
    tracks = GaugeMetricFamily("sam3_stream_tracks_alive", "Tracks in the last processed frame.", labels=["stream"])
    for s in live:
        stats = s["stats"]
        fps.add_metric([s["id"]], float(stats["processed_fps"]))
        processed.add_metric([s["id"]], float(stats["frames_processed"]))
        dropped.add_metric([s["id"]], float(stats["frames_dropped"]))
        latency.add_metric([s["id"]], float(stats["latency_ms_p50"] or 0.0))
        tracks.add_metric([s["id"]], float(stats["tracks_alive"]))
    yield _gauge("sam3_streams_live", "Streams starting or running.", len(live))
    yield from (fps, processed, dropped, latency, tracks)
