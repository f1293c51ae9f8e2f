"""Building the pipeline for the worker thread, and the warm-up inference.

Kept apart from app.py so the HTTP layer never imports the runtime's heavier modules until the
worker thread needs them (and so tests can inject a fake pipeline without touching this).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import numpy as np

from engines.errors import BundleError
from server.settings import Settings

log = logging.getLogger("server.loading")


def load_pipeline(settings: Settings, on_state: Callable[[str], None]) -> Any:
    """``Sam3Pipeline.from_bundle`` with the server's limits; reports ``building_engines``.

    Backend options (precision, engines_dir) are passed only where this runtime's
    ``from_bundle``/``open_backend`` accept them: ONNX Runtime runs the fp32 graphs and refuses
    ``precision="fp16"``, which the container sets for TensorRT (and keeps on the ORT fallback).
    """
    from engines.backend import open_backend
    from engines.bundle import Bundle
    from engines.pipeline import Sam3Pipeline

    if settings.bundle is None:
        raise BundleError("no bundle: pass --bundle DIR or set SAM3_BUNDLE")
    bundle = Bundle(settings.bundle)
    kind = settings.backend
    if kind == "auto":
        from engines.tensorrt import tensorrt_available

        kind = "tensorrt" if tensorrt_available() else "onnxruntime"
    accepted = set(inspect.signature(Sam3Pipeline.from_bundle).parameters) | set(
        inspect.signature(open_backend).parameters
    )
    options: dict[str, Any] = {}
    if kind == "tensorrt":
        options["precision"] = settings.precision
        if _plans_missing(bundle, settings):
            # The TensorRT backend builds absent plans inside from_bundle (minutes on a Jetson).
            on_state("building_engines")
    if settings.engines_dir is not None:
        options["engines_dir"] = settings.engines_dir
    dropped = sorted(k for k in options if k not in accepted)
    if dropped:
        log.warning("this runtime does not take %s; using its defaults", ", ".join(dropped))
    pipeline = Sam3Pipeline.from_bundle(
        bundle,
        kind,
        max_megapixels=settings.max_megapixels,
        max_prompts=settings.max_prompts,
        max_prompt_chars=settings.max_prompt_chars,
        **{k: v for k, v in options.items() if k in accepted},
    )
    on_state("loading")
    log.info("loaded bundle %s (backend %s, precision %s)", settings.bundle, *backend_identity(pipeline))
    return pipeline


def _plans_missing(bundle: Any, settings: Settings) -> bool:
    """A cheap guess (no TensorRT import): a part with no plan file at all will be built."""
    engines_dir = settings.engines_dir or bundle.engines_dir
    return any(not list(engines_dir.glob(f"{part}.*.plan")) for part in bundle.manifest.parts)


def backend_identity(pipeline: Any) -> tuple[str, str]:
    """(backend kind, precision) as /info and every /segment response report them."""
    backend = getattr(pipeline, "backend", None)
    kind = getattr(backend, "kind", None) or getattr(pipeline, "backend_name", "") or ""
    precision = getattr(backend, "precision", None) or getattr(pipeline, "precision", "") or ""
    return str(kind), str(precision)


def tokenizer_hash(pipeline: Any) -> str:
    """Text-cache namespace: a new tokenizer must never reuse old text embeddings."""
    tokenizer = getattr(pipeline, "tokenizer", None)
    digest = getattr(tokenizer, "tokenizer_hash", None)
    if digest:
        return str(digest)
    return str(pipeline.manifest.tokenizer.sha256)


def warm_up(pipeline: Any) -> None:
    """One small end-to-end inference: lazy allocations and kernel selection happen now."""
    from engines.types import LoadedImage

    pixels = np.full((64, 64, 3), 127, dtype=np.uint8)
    image = LoadedImage(pixels=pixels, image_id="warmup")
    embedding = pipeline.encode_image(image)
    text = pipeline.encode_text(["warm up"])
    pipeline.decode(embedding, text, score_threshold=1.0, mask_threshold=0.5, max_detections=1, with_masks=True)
