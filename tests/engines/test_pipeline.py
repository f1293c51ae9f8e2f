"""Sam3Pipeline and `python -m engines segment` on the tiny bundle (ONNX Runtime, CPU, no torch)."""

from __future__ import annotations

import dataclasses
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from engines.options import SegmentOptions
from engines.errors import (
    ImageTooLarge,
    InvalidImage,
    InvalidInput,
    InvalidOption,
    InvalidPrompt,
    PromptTooLong,
    TooManyPrompts,
)
from engines.pipeline import STAGES, Sam3Pipeline
from engines.postprocess import decode_mask
from engines.types import ImageEmbedding, Prompt

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a cat", "the red car on the left", "person", "a photo of a dog"]


def _photo(width: int = 160, height: int = 120) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x * y) % 256], -1).astype(np.uint8)
    cv2.circle(image, (width // 3, height // 2), height // 4, (220, 30, 30), -1)
    return image


@pytest.fixture(scope="module")
def pipeline(tiny_bundle: Path):
    with Sam3Pipeline.from_bundle(tiny_bundle, "onnxruntime", max_prompts=12) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.jpg"
    cv2.imwrite(str(path), _photo()[:, :, ::-1])
    return path


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb needs no more)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def _same_detections(a, b, *, atol: float = 1e-4) -> None:
    assert len(a) == len(b)
    for da, db in zip(a, b):
        assert da.score == pytest.approx(db.score, abs=atol)
        np.testing.assert_allclose(da.box, db.box, atol=1e-3)
        inter = np.logical_and(da.mask, db.mask).sum()
        union = np.logical_or(da.mask, db.mask).sum()
        assert union == 0 or inter / union >= 0.999


# ------------------------------------------------------------------ no torch on the device


def test_runtime_never_imports_torch(tiny_bundle: Path) -> None:
    script = f"""
import sys
import numpy as np
import engines.tensorrt, engines.tensorrt_build, engines.onnxruntime, engines.__main__
from engines.options import SegmentOptions
from engines.pipeline import Sam3Pipeline
pipe = Sam3Pipeline.from_bundle({str(tiny_bundle)!r}, "auto")
result = pipe.segment(np.zeros((64, 80, 3), np.uint8) + 127, ["a cat", "a dog"], SegmentOptions(score_threshold=0.0))
assert len(result.results) == 2
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "transformers", "export"))
print("LEAKED", leaked)
sys.exit(1 if leaked else 0)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LEAKED []" in proc.stdout


# ------------------------------------------------------------------ batching


def _decode(pipeline: Sam3Pipeline, image_emb: ImageEmbedding, text_emb, options: SegmentOptions | None = None):
    """The decoder alone: both embeddings given, as the server calls segment after its caches."""
    return pipeline.segment(image_emb, list(text_emb.prompts), options, text=text_emb).results


def test_batched_decode_equals_per_prompt_decode(pipeline: Sam3Pipeline) -> None:
    image_emb = pipeline.encode_image(_photo())
    text_emb = pipeline.encode_text(PROMPTS)
    before = pipeline.stage_calls["decoder"]
    batched = _decode(pipeline, image_emb, text_emb, SegmentOptions(score_threshold=0.0))
    assert pipeline.stage_calls["decoder"] == before + 1  # four prompts, one decoder run
    assert [r.prompt for r in batched] == PROMPTS
    assert all(len(r.detections) == pipeline.manifest.model.num_queries for r in batched)
    for prompt, result in zip(PROMPTS, batched):
        single = _decode(pipeline, image_emb, pipeline.encode_text([prompt]), SegmentOptions(score_threshold=0.0))
        _same_detections(result.detections, single[0].detections)
    # the prompts differ, so equality above is not the trivial "every row is the same"
    assert batched[0].detections[0].score != pytest.approx(batched[1].detections[0].score, abs=1e-6)


def test_prompts_beyond_max_batch_are_chunked(pipeline: Sam3Pipeline) -> None:
    max_batch = pipeline.parts["decoder"].max_batch
    prompts = [f"object number {i}" for i in range(max_batch + 2)]
    image_emb = pipeline.encode_image(_photo())
    before = pipeline.stage_calls["decoder"]
    results = _decode(pipeline, image_emb, pipeline.encode_text(prompts), SegmentOptions(score_threshold=0.0))
    assert pipeline.stage_calls["decoder"] == before + 2
    last = _decode(pipeline, image_emb, pipeline.encode_text(prompts[-1:]), SegmentOptions(score_threshold=0.0))
    _same_detections(results[-1].detections, last[0].detections)


def test_fp16_cached_embedding_decodes_like_fp32(pipeline: Sam3Pipeline) -> None:
    image_emb = pipeline.encode_image(_photo())
    half = dataclasses.replace(
        image_emb, tensors={k: v.astype(np.float16) for k, v in image_emb.tensors.items()}
    )
    text_emb = pipeline.encode_text(PROMPTS[:2])
    full = _decode(pipeline, image_emb, text_emb, SegmentOptions(score_threshold=0.0, with_masks=False))
    cached = _decode(pipeline, half, text_emb, SegmentOptions(score_threshold=0.0, with_masks=False))
    for a, b in zip(full, cached):
        assert sorted(d.score for d in a.detections) == pytest.approx(
            sorted(d.score for d in b.detections), abs=1e-2
        )


# ------------------------------------------------------------------ segment, timings, counters


def test_segment_reports_stages_and_counts_encoder_runs(pipeline: Sam3Pipeline, photo_file: Path) -> None:
    result = pipeline.segment(photo_file, PROMPTS[:2], SegmentOptions(score_threshold=0.0, max_detections=3))
    assert result.image_size == (160, 120)
    assert set(result.timings_ms) == {*STAGES, "total"}
    assert result.timings_ms["total"] >= result.timings_ms["image_encoder"] > 0
    assert not result.cache_hit
    for res in result.results:
        assert len(res.detections) == 3
        scores = [d.score for d in res.detections]
        assert scores == sorted(scores, reverse=True)
        assert res.detections[0].mask.shape == (120, 160)

    embedding = pipeline.encode_image(photo_file)
    assert embedding.encoder_key == pipeline.manifest.part("image_encoder").weights_sha256
    image_runs = pipeline.stage_calls["image_encoder"]
    cached = pipeline.segment(embedding, PROMPTS[:2], SegmentOptions(score_threshold=0.0, max_detections=3))
    assert pipeline.stage_calls["image_encoder"] == image_runs  # cache hit: no encoder run
    assert cached.cache_hit and cached.timings_ms["image_encoder"] == 0.0
    _same_detections(cached.results[0].detections, result.results[0].detections)


def test_embedding_from_another_encoder_is_refused(pipeline: Sam3Pipeline) -> None:
    embedding = pipeline.encode_image(_photo())
    foreign = dataclasses.replace(embedding, encoder_key="0" * 64)
    with pytest.raises(InvalidInput, match="different image encoder"):
        _decode(pipeline, foreign, pipeline.encode_text(["a cat"]))
    assert isinstance(embedding, ImageEmbedding)


# ------------------------------------------------------------------ bad input -> typed errors


@pytest.mark.parametrize(
    "prompts, error",
    [
        ([], InvalidPrompt),
        ([""], InvalidPrompt),
        (["a cat", "   "], InvalidPrompt),
        (["x" * 10_000], PromptTooLong),
        ([f"p{i}" for i in range(13)], TooManyPrompts),
        ("a cat", InvalidPrompt),  # a bare string, not a list
        ([b"a cat"], InvalidPrompt),
        (["a cat", None], InvalidPrompt),
        ([Prompt()], InvalidPrompt),  # neither text nor boxes
    ],
    ids=["empty-list", "empty-string", "blank", "10000-chars", "too-many", "bare-string", "bytes", "none",
         "empty-prompt"],
)
def test_bad_prompts_are_typed_errors(pipeline: Sam3Pipeline, prompts, error) -> None:
    runs = pipeline.stage_calls["image_encoder"]
    with pytest.raises(error):
        pipeline.segment(_photo(), prompts)
    assert pipeline.stage_calls["image_encoder"] == runs  # refused before any encoder work


@pytest.mark.parametrize(
    "image, error",
    [
        (b"definitely not an image", InvalidImage),
        (b"", InvalidImage),
        (_png_header(30_000, 30_000), ImageTooLarge),
        (np.zeros((0, 0, 3), np.uint8), InvalidImage),
    ],
    ids=["undecodable", "zero-bytes", "bomb-header", "0x0"],
)
def test_bad_images_are_typed_errors(pipeline: Sam3Pipeline, image, error) -> None:
    with pytest.raises(error):
        pipeline.segment(image, ["a cat"])


def test_one_pixel_image_segments(pipeline: Sam3Pipeline) -> None:
    result = pipeline.segment(
        np.full((1, 1, 3), 200, np.uint8), ["a cat"], SegmentOptions(score_threshold=0.0, max_detections=1)
    )
    assert result.image_size == (1, 1) and result.results[0].detections[0].mask.shape == (1, 1)


@pytest.mark.parametrize(
    "options",
    [{"score_threshold": 1.5}, {"mask_threshold": -0.1}, {"score_threshold": "high"}, {"max_detections": -1}],
)
def test_bad_options_are_typed_errors(pipeline: Sam3Pipeline, options: dict) -> None:
    with pytest.raises(InvalidOption):
        pipeline.segment(_photo(), ["a cat"], SegmentOptions(**options))


# ------------------------------------------------------------------ the CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engines", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_cli_segment_writes_document_and_overlay(tiny_bundle: Path, photo_file: Path, tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "result.json", tmp_path / "overlay.png"
    proc = _cli(
        "segment", str(tiny_bundle), str(photo_file), "a cat", "red car",
        "--score-threshold", "0", "--max-detections", "2", "--backend", "onnxruntime",
        "--json", str(out_json), "--out", str(out_png),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "'a cat': 2 detection(s)" in proc.stdout and "timings ms" in proc.stdout
    document = json.loads(out_json.read_text())
    assert document["image_size"] == {"width": 160, "height": 120}
    assert [r["prompt"] for r in document["results"]] == ["a cat", "red car"]
    for res in document["results"]:
        scores = [d["score"] for d in res["detections"]]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True)
        for det in res["detections"]:
            assert len(det["box"]) == 4 and det["mask"]["format"] == "rle"
            assert decode_mask(det["mask"]).shape == (120, 160)
    overlay = cv2.imread(str(out_png))
    assert overlay.shape == (120, 160, 3)
    original = cv2.imread(str(photo_file))
    assert np.abs(overlay.astype(int) - original.astype(int)).max() > 50  # something was drawn


@pytest.mark.parametrize(
    "args, code",
    [
        (["IMAGE", ""], "invalid_prompt"),
        (["IMAGE", "x" * 10_000], "prompt_too_long"),
        (["GARBAGE", "a cat"], "invalid_image"),
        (["IMAGE", "a cat", "--score-threshold", "2"], "invalid_option"),
        (["IMAGE", "a cat", "--out", "overlay.jpg"], "invalid_option"),
    ],
    ids=["empty-prompt", "long-prompt", "undecodable", "threshold", "not-png"],
)
def test_cli_bad_input_is_one_line_not_a_traceback(
    tiny_bundle: Path, photo_file: Path, tmp_path: Path, args: list[str], code: str
) -> None:
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8 not really a jpeg")
    args = [{"IMAGE": str(photo_file), "GARBAGE": str(garbage)}.get(a, a) for a in args]
    proc = _cli("segment", str(tiny_bundle), *args, "--backend", "onnxruntime")
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error [{code}]:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_missing_bundle_is_a_bundle_error(tmp_path: Path, photo_file: Path) -> None:
    proc = _cli("segment", str(tmp_path / "nope"), str(photo_file), "a cat")
    assert proc.returncode == 1 and proc.stderr.startswith("error [bundle_error]:")


def test_bench_prints_every_stage(tiny_bundle: Path) -> None:
    proc = _cli("bench", str(tiny_bundle), "--backend", "onnxruntime", "--iterations", "2", "--warmup", "0")
    assert proc.returncode == 0, proc.stderr
    for stage in (*STAGES, "total", "decode (cached)"):
        assert stage in proc.stdout
