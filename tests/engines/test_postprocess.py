"""postprocess() against transformers' post_process_instance_segmentation; mask encodings round-trip."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from engines.options import SegmentOptions
from engines.errors import InvalidOption
from engines.postprocess import decode_mask, encode_mask, postprocess, result_document
from engines.types import Detection, PromptResult


def _outputs(seed: int, queries: int = 200, mask_hw: int = 72) -> dict[str, np.ndarray]:
    """Random decoder outputs shaped like SAM3's, with blob-like mask logits and a few confident queries."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:mask_hw, 0:mask_hw].astype(np.float32) / mask_hw
    centres = rng.uniform(0.1, 0.9, (queries, 2)).astype(np.float32)
    radii = rng.uniform(0.05, 0.3, queries).astype(np.float32)
    dist = np.sqrt((xx[None] - centres[:, 0, None, None]) ** 2 + (yy[None] - centres[:, 1, None, None]) ** 2)
    masks = (radii[:, None, None] - dist) * 40 + rng.normal(0, 1.5, (queries, mask_hw, mask_hw))
    xy0 = rng.uniform(0, 0.6, (queries, 2))
    boxes = np.concatenate([xy0, xy0 + rng.uniform(0.05, 0.4, (queries, 2))], axis=1)
    logits = rng.normal(-3, 2, queries)
    logits[rng.choice(queries, 12, replace=False)] = rng.uniform(1, 6, 12)
    return {
        "pred_masks": masks.astype(np.float32),
        "pred_boxes": boxes.astype(np.float32),
        "pred_logits": logits.astype(np.float32),
        "presence": np.asarray([rng.uniform(0.5, 4)], dtype=np.float32),
    }


def _reference(out: dict[str, np.ndarray], size: tuple[int, int], threshold: float, mask_threshold: float):
    torch = pytest.importorskip("torch")
    image_processing = pytest.importorskip("transformers.models.sam3.image_processing_sam3")
    processor = image_processing.Sam3ImageProcessor()
    outputs = SimpleNamespace(
        pred_masks=torch.from_numpy(out["pred_masks"])[None],
        pred_boxes=torch.from_numpy(out["pred_boxes"])[None],
        pred_logits=torch.from_numpy(out["pred_logits"])[None],
        presence_logits=torch.from_numpy(out["presence"])[None],
    )
    (res,) = processor.post_process_instance_segmentation(
        outputs, threshold=threshold, mask_threshold=mask_threshold, target_sizes=[size]
    )
    order = torch.argsort(res["scores"], descending=True, stable=True)
    return res["scores"][order].numpy(), res["boxes"][order].numpy(), res["masks"][order].numpy().astype(bool)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.mark.parametrize(
    "seed, size, threshold",
    [(0, (480, 640), 0.5), (1, (1000, 750), 0.3), (2, (37, 1200), 0.5), (3, (64, 48), 0.4), (4, (288, 288), 0.5)],
)
def test_equals_transformers(seed: int, size: tuple[int, int], threshold: float) -> None:
    out = _outputs(seed)
    ref_scores, ref_boxes, ref_masks = _reference(out, size, threshold, 0.5)
    dets = postprocess(
        out["pred_masks"], out["pred_boxes"], out["pred_logits"], out["presence"], size,
        SegmentOptions(score_threshold=threshold),
    )
    assert len(dets) == len(ref_scores) > 0
    scores = np.asarray([d.score for d in dets])
    assert np.all(np.diff(scores) <= 0)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray([d.box for d in dets]), ref_boxes, atol=0.5, rtol=0)
    for det, ref in zip(dets, ref_masks):
        assert det.mask.shape == size and det.mask.dtype == bool
        assert _iou(det.mask, ref) >= 0.99


def test_topk_before_resize_and_no_masks() -> None:
    out = _outputs(5)
    size = (300, 400)
    full = postprocess(out["pred_masks"], out["pred_boxes"], out["pred_logits"], out["presence"], size, SegmentOptions(score_threshold=0.1))
    top3 = postprocess(
        out["pred_masks"], out["pred_boxes"], out["pred_logits"], out["presence"], size,
        SegmentOptions(score_threshold=0.1, max_detections=3),
    )
    assert len(full) > 3 and len(top3) == 3
    for a, b in zip(full[:3], top3):
        assert a.score == b.score and a.box == b.box and np.array_equal(a.mask, b.mask)
    bare = postprocess(
        out["pred_masks"], out["pred_boxes"], out["pred_logits"], out["presence"], size,
        SegmentOptions(score_threshold=0.1, with_masks=False),
    )
    assert [d.score for d in bare] == [d.score for d in full] and all(d.mask is None for d in bare)


def test_only_kept_masks_are_kept_at_low_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    import engines.masks as masks

    drawn = []
    real = masks.LowResMask.intervals
    monkeypatch.setattr(masks.LowResMask, "intervals", lambda self: drawn.append(1) or real(self))
    out = _outputs(6)
    dets = postprocess(
        out["pred_masks"], out["pred_boxes"], out["pred_logits"], out["presence"], (5000, 5000),
        SegmentOptions(score_threshold=0.0, max_detections=2),
    )
    assert len(dets) == 2 and not drawn  # nothing drawn at full resolution yet
    for det in dets:
        assert isinstance(det.mask_source, masks.LowResMask) and det.mask_source.probs.shape == (72, 72)
        assert det.mask_source.probs.base is None or det.mask_source.probs.base is not out["pred_masks"]
    doc = result_document((5000, 5000), [PromptResult("p", dets)], "rle")
    assert len(drawn) == 2 and doc["results"][0]["detections"][0]["mask"]["size"] == [5000, 5000]


def test_presence_scalar_and_nothing_kept() -> None:
    out = _outputs(7)
    a = postprocess(out["pred_masks"], out["pred_boxes"], out["pred_logits"], float(out["presence"][0]), (10, 10))
    b = postprocess(out["pred_masks"], out["pred_boxes"], out["pred_logits"], out["presence"], (10, 10))
    assert [d.score for d in a] == [d.score for d in b]
    assert postprocess(out["pred_masks"], out["pred_boxes"], out["pred_logits"], -50.0, (10, 10)) == ()


@pytest.mark.parametrize("kwargs", [{"score_threshold": 1.5}, {"mask_threshold": -0.1}, {"max_detections": -1}])
def test_bad_options(kwargs) -> None:
    out = _outputs(8)
    with pytest.raises(InvalidOption):
        postprocess(out["pred_masks"], out["pred_boxes"], out["pred_logits"], out["presence"], (10, 10), SegmentOptions(**kwargs))


def _blob_mask(h: int = 120, w: int = 90) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.uint8)
    cv2.circle(mask, (30, 40), 20, 1, -1)
    cv2.rectangle(mask, (55, 70), (85, 110), 1, -1)
    return mask.astype(bool)


def test_rle_round_trip_pycocotools() -> None:
    from pycocotools import mask as mask_utils

    mask = _blob_mask()
    enc = encode_mask(mask, "rle")
    assert enc["format"] == "rle" and enc["size"] == [120, 90] and isinstance(enc["counts"], str)
    decoded = mask_utils.decode({"size": enc["size"], "counts": enc["counts"].encode()})
    np.testing.assert_array_equal(decoded.astype(bool), mask)
    np.testing.assert_array_equal(decode_mask(enc), mask)


def test_png_round_trip_cv2() -> None:
    mask = _blob_mask()
    enc = encode_mask(mask, "png")
    assert enc["format"] == "png" and enc["size"] == [120, 90]
    img = cv2.imdecode(np.frombuffer(base64.b64decode(enc["data"]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert img.shape == (120, 90)
    np.testing.assert_array_equal(img > 0, mask)


def test_polygon_round_trip() -> None:
    mask = _blob_mask()
    enc = encode_mask(mask, "polygon")
    assert enc["format"] == "polygon" and enc["size"] == [120, 90] and len(enc["polygons"]) == 2
    assert all(len(p) % 2 == 0 and len(p) >= 6 for p in enc["polygons"])
    assert _iou(decode_mask(enc), mask) >= 0.98


def test_mask_format_none_and_bad() -> None:
    assert encode_mask(_blob_mask(), "none") is None
    with pytest.raises(InvalidOption):
        encode_mask(_blob_mask(), "jpeg")
    with pytest.raises(InvalidOption):
        result_document((10, 10), [], "bmp")


def test_result_document_shape() -> None:
    mask = _blob_mask()
    dets = (Detection(score=0.9, box=(1.0, 2.0, 30.5, 40.0), mask=mask), Detection(score=0.6, box=(0, 0, 5, 5), mask=mask))
    doc = result_document((90, 120), [PromptResult("cat", dets), PromptResult("dog", ())], "rle")
    json.dumps(doc)  # plain JSON types only
    assert doc["image_size"] == {"width": 90, "height": 120}
    assert [r["prompt"] for r in doc["results"]] == ["cat", "dog"]
    first = doc["results"][0]["detections"][0]
    assert set(first) == {"score", "box", "mask"}
    assert first["score"] == 0.9 and first["box"] == [1.0, 2.0, 30.5, 40.0]
    assert first["mask"]["format"] == "rle" and first["mask"]["size"] == [120, 90]
    assert doc["results"][1]["detections"] == []
    assert result_document((90, 120), [PromptResult("cat", dets)], "none")["results"][0]["detections"][0]["mask"] is None


def test_runtime_modules_do_not_import_torch() -> None:
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, numpy as np\n"
        "import engines.preprocess, engines.postprocess, engines.tokenizer\n"
        "from engines.postprocess import postprocess, encode_mask\n"
        "d = postprocess(np.zeros((3, 8, 8), np.float32), np.full((3, 4), 0.5, np.float32),"
        " np.full(3, 5.0, np.float32), 5.0, (16, 16))\n"
        "assert len(d) == 3 and encode_mask(d[0].mask, 'rle')\n"
        "engines.preprocess.to_pixel_values(np.zeros((5, 7, 3), np.uint8), engines.preprocess.Preprocessing(image_size=14))\n"
        "bad = [m for m in ('torch', 'torchvision', 'transformers', 'export') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], check=True)
