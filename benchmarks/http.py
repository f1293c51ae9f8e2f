"""``python -m benchmarks http``: a bounded asyncio httpx load loop against a running server.

Why not locust: one process, no web UI, no extra dependency on the Jetson; what we need is a
fixed concurrency, a cold/warm mix and the server's own stage timings from each response.

- warm request: the primed image's bytes again (the server hashes them: cache hit) + prompts.
- cold request: the same pixels with a unique metadata chunk (PNG tEXt / JPEG COM), so the
  sha256 -- the cache key -- is new and the image encoder runs, without paying to generate
  a new image in the client. The schedule is deterministic (every 1/f-th request is cold).
Bounded by ``--requests`` and/or ``--duration``; loopback only unless ``--allow-remote``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np

from benchmarks.stats import summarize
from benchmarks.system import system_info
from clients.wire import form_fields, image_payload
from engines.types import STAGES

SERVER_STAGES = ("queue", *STAGES, "total")  # the response's timings_ms keys


@dataclass
class HttpBenchConfig:
    url: str
    concurrency: int = 1
    requests: int | None = 40
    duration_s: float | None = None
    images: list[Path] = field(default_factory=list)  # first one is used; empty: synthetic JPEG
    prompts: list[str] = field(default_factory=lambda: ["a person", "a dog"])
    cold_fraction: float = 0.25
    mask_format: str = "rle"
    api_key: str | None = None
    timeout_s: float = 120.0
    allow_remote: bool = False
    compare: Path | None = None  # a pipeline benchmark JSON of the same bundle
    compare_bundle: Path | None = None  # the server's bundle: direct calls paired with requests
    pairs: int = 8

    def check(self) -> None:
        if self.concurrency < 1:
            raise ValueError("--concurrency must be >= 1")
        if self.requests is None and self.duration_s is None:
            raise ValueError("give --requests and/or --duration (the load must be bounded)")
        if (self.requests is not None and self.requests < 1) or (self.duration_s is not None and self.duration_s <= 0):
            raise ValueError("--requests must be >= 1 and --duration > 0")
        if not 0.0 <= self.cold_fraction <= 1.0:
            raise ValueError("--cold-fraction must be in [0, 1]")
        if not self.allow_remote and not is_loopback(self.url):
            raise ValueError(f"{self.url} is not a loopback address; pass --allow-remote to load another host")


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def unique_variant(data: bytes, n: int) -> bytes:
    """Same pixels, different bytes: a PNG tEXt chunk or a JPEG COM segment carrying ``n``."""
    payload = f"sam3-bench-{n}-{os.getpid()}-{time.time_ns()}".encode()
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        chunk = b"tEXt" + b"Comment\x00" + payload
        body = struct.pack(">I", len(chunk) - 4) + chunk + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
        ihdr_end = 8 + 8 + 13 + 4  # signature + IHDR (length, type, 13 data bytes, crc)
        return data[:ihdr_end] + body + data[ihdr_end:]
    if data.startswith(b"\xff\xd8"):
        return data[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + data[2:]
    raise ValueError("cold requests need a PNG or JPEG image")


def is_cold(index: int, fraction: float) -> bool:
    """Deterministic, evenly spread: request i is cold when floor((i+1)f) > floor(i f)."""
    return int((index + 1) * fraction) > int(index * fraction)


@dataclass
class _Sample:
    kind: str
    ms: float
    status: int  # 0: transport error
    timings: dict[str, float]


async def _load(config: HttpBenchConfig, image: bytes, name: str, media: str) -> tuple[list[_Sample], float]:
    headers = {"X-API-Key": config.api_key} if config.api_key else {}
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    fields = form_fields(config.prompts, {"mask_format": config.mask_format})
    samples: list[_Sample] = []
    counter = iter(range(1 << 62))
    async with httpx.AsyncClient(base_url=config.url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=config.timeout_s) as client:
        # Prime: embedding + text cache, so "warm" means warm from the first measured request.
        prime = await client.post("/segment", files={"image": (name, image, media)}, data=fields)
        if prime.status_code != 200:
            raise RuntimeError(f"priming request failed: HTTP {prime.status_code} {prime.text[:200]}")
        started = time.perf_counter()
        deadline = started + config.duration_s if config.duration_s else None

        async def worker() -> None:
            while True:
                i = next(counter)
                if config.requests is not None and i >= config.requests:
                    return
                if deadline is not None and time.perf_counter() >= deadline:
                    return
                kind = "cold" if is_cold(i, config.cold_fraction) else "warm"
                data = unique_variant(image, i) if kind == "cold" else image
                t0 = time.perf_counter()
                try:
                    response = await client.post("/segment", files={"image": (name, data, media)}, data=fields)
                    status = response.status_code
                    timings = response.json().get("timings_ms", {}) if status == 200 else {}
                except httpx.TransportError:
                    status, timings = 0, {}
                samples.append(_Sample(kind, (time.perf_counter() - t0) * 1e3, status, timings))

        await asyncio.gather(*(worker() for _ in range(config.concurrency)))
        wall = time.perf_counter() - started
    return samples, wall


def _server_info(config: HttpBenchConfig) -> dict[str, Any]:
    headers = {"X-API-Key": config.api_key} if config.api_key else {}
    response = httpx.get(f"{config.url.rstrip('/')}/info", headers=headers, timeout=30)
    response.raise_for_status()
    info = response.json()
    return {"model": info.get("model", {}), "queue": info.get("queue", {}), "limits": info.get("limits", {})}


def run_http_benchmark(config: HttpBenchConfig) -> dict[str, Any]:
    config.check()
    if config.images:
        name, image, media = image_payload(config.images[0])
    else:
        from benchmarks.pipeline import synthetic_jpeg

        name, image, media = "synthetic-0.jpg", synthetic_jpeg(0), "image/jpeg"
    if not image.startswith((b"\x89PNG", b"\xff\xd8")):  # other formats: send as PNG
        import io

        from PIL import Image

        name, image, media = image_payload(np.asarray(Image.open(io.BytesIO(image)).convert("RGB")))
    server = _server_info(config)
    samples, wall = asyncio.run(_load(config, image, name, media))
    ok = [s for s in samples if s.status == 200]
    by_status: dict[str, int] = {}
    for s in samples:
        by_status[str(s.status or "transport")] = by_status.get(str(s.status or "transport"), 0) + 1
    if not ok:
        raise RuntimeError(f"no request succeeded (status counts {by_status})")
    latency = {"all": summarize([s.ms for s in ok])}
    server_p50: dict[str, dict[str, float]] = {}
    for kind in ("cold", "warm"):
        chosen = [s for s in ok if s.kind == kind]
        if chosen:
            latency[kind] = summarize([s.ms for s in chosen])
            server_p50[kind] = {
                stage: round(float(np.median([s.timings.get(stage, 0.0) for s in chosen])), 3)
                for stage in SERVER_STAGES
            }
    doc: dict[str, Any] = {
        "kind": "http",
        "schema_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "system": system_info(),
        "config": {
            "url": config.url, "concurrency": config.concurrency, "requests": config.requests,
            "duration_s": config.duration_s, "cold_fraction": config.cold_fraction, "prompts": list(config.prompts),
            "mask_format": config.mask_format, "image": {"name": name, "bytes": len(image)},
        },
        "server": server,
        "wall_s": round(wall, 3),
        "requests": {
            "sent": len(samples),
            "ok": len(ok),
            "errors": len(samples) - len(ok),
            "rate_limited": by_status.get("429", 0),
            "transport_errors": by_status.get("transport", 0),
            "by_status": by_status,
        },
        "throughput_rps": round(len(ok) / wall, 3),
        "latency": latency,
        "server_timings_p50_ms": server_p50,
        "comparison": _compare(config.compare, latency) if config.compare else None,
        "paired": _paired(config, image, name, media) if config.compare_bundle else None,
    }
    doc["goals"] = http_goals(doc)
    return doc


def _compare(path: Path, latency: dict[str, Any]) -> dict[str, float]:
    """HTTP p50 over the direct pipeline p50: warm HTTP (image and text cached on the server)
    against the pipeline's text-cached path, cold HTTP against the pipeline's cold path."""
    pipeline = json.loads(Path(path).read_text())
    out = {}
    if "warm" in latency:
        out["warm_http_over_pipeline_text_cached"] = round(
            latency["warm"]["p50"] / pipeline["paths"]["text_cached"]["end_to_end"]["p50"], 4)
    if "cold" in latency:
        out["cold_http_over_pipeline_cold"] = round(
            latency["cold"]["p50"] / pipeline["paths"]["cold"]["end_to_end"]["p50"], 4)
    return out


def _paired(config: HttpBenchConfig, image: bytes, name: str, media: str) -> dict[str, Any]:
    """HTTP requests and direct ``Sam3Pipeline`` calls on the same bundle, alternated one by one.

    Comparing against a pipeline run taken minutes earlier measures the machine's load as
    much as the server (on a shared 2-core box we saw 0.4x to 1.9x that way). Alternating gives
    both sides the same conditions. Both sides do the same work: warm = image and text
    embeddings cached, cold = new image bytes with the text cached (what the server does),
    RLE masks in the response document.
    """
    from engines.pipeline import Sam3Pipeline
    from engines.postprocess import result_document

    headers = {"X-API-Key": config.api_key} if config.api_key else {}
    fields = form_fields(config.prompts, {"mask_format": config.mask_format})
    samples: dict[str, dict[str, list[float]]] = {k: {"http": [], "direct": []} for k in ("warm", "cold")}
    with Sam3Pipeline.from_bundle(config.compare_bundle, max_prompts=len(config.prompts)) as pipe, httpx.Client(
        base_url=config.url.rstrip("/"), headers=headers, timeout=config.timeout_s
    ) as client:
        embedding = pipe.encode_image(image)
        text = pipe.encode_text(config.prompts)

        def direct(data: bytes | None) -> None:
            result = pipe.segment(embedding if data is None else data, config.prompts, text=text)
            result_document(result.image_size, result.results, config.mask_format)

        def http(data: bytes) -> None:
            response = client.post("/segment", files={"image": (name, data, media)}, data=fields)
            response.raise_for_status()
            response.json()

        http(image)  # warm-up both sides (server caches, ORT first-run allocations)
        direct(None)
        for i in range(config.pairs):
            for kind in ("warm", "cold"):
                data = image if kind == "warm" else unique_variant(image, 10_000_000 + i)
                direct_input = None if kind == "warm" else data
                calls = [("http", lambda d=data: http(d)), ("direct", lambda d=direct_input: direct(d))]
                for side, call in calls if i % 2 == 0 else calls[::-1]:
                    started = time.perf_counter()
                    call()
                    samples[kind][side].append((time.perf_counter() - started) * 1e3)
    out: dict[str, Any] = {"pairs": config.pairs}
    for kind, sides in samples.items():
        out[kind] = {"http": summarize(sides["http"]), "direct": summarize(sides["direct"])}
        out[f"{kind}_http_over_direct"] = round(out[kind]["http"]["p50"] / out[kind]["direct"]["p50"], 4)
    return out


def http_goals(doc: dict[str, Any]) -> list[dict[str, Any]]:
    from benchmarks.pipeline import goal

    paired = doc.get("paired")
    if paired:
        return [goal(f"HTTP /segment p50 / direct pipeline p50, {kind}, alternated in this run", 1.10,
                      paired[f"{kind}_http_over_direct"]) for kind in ("warm", "cold")]
    comparison = doc.get("comparison") or {}
    return [goal(f"HTTP /segment p50 / direct pipeline p50 ({key}, from --compare)", 1.10, value)
            for key, value in comparison.items()]
