"""Exemplar (box) prompts in the graphs: the ROI pooling without RoiAlign equals torchvision's,
and the geometry encoder + exemplar decoder give transformers' and Meta's answers.

Boxes are transformers' and Meta's inputs: normalised cxcywh, label 1 positive / 0 negative,
-10 padding (valid boxes first, as the runtime packs them).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from engines.options import SegmentOptions
from engines.bundle import TensorNames as T
from export.split import reference_forward, roi_pool, split_model
from export.verify import mask_iou

# name -> (boxes, labels, with text): the cases the parity bar is stated for
CASES = {
    "one_positive": ([[0.5, 0.5, 0.3, 0.4]], [1], False),
    "three_positive": ([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.5], [0.5, 0.5, 1.0, 1.0]], [1, 1, 1], False),
    "positive_and_negative": ([[0.3, 0.4, 0.25, 0.3], [0.7, 0.7, 0.2, 0.2]], [1, 0], False),
    "one_positive_with_text": ([[0.4, 0.6, 0.5, 0.3]], [1], True),
    "negative_with_text": ([[0.2, 0.8, 0.1, 0.2]], [0], True),
}
MAX_BOXES = 4


def padded(boxes: list, labels: list, count: int = MAX_BOXES) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, count, 4] boxes and [1, count] int32 labels, padding (-10) after the valid boxes."""
    out = torch.zeros(1, count, 4)
    lab = torch.full((1, count), -10, dtype=torch.int32)
    out[0, : len(boxes)] = torch.tensor(boxes).reshape(-1, 4)
    lab[0, : len(labels)] = torch.tensor(labels, dtype=torch.int32)
    return out, lab


def test_roi_pool_equals_torchvision_roi_align() -> None:
    """As the geometry encoder calls it: roi_align(features, boxes, roi_size), aligned=False,
    adaptive sampling; boxes anywhere in the map, including the whole map and sub-pixel ones."""
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for height, width, size in ((13, 11, 7), (72, 72, 7), (18, 18, 7), (8, 8, 3)):
        features = torch.randn(1, 16, height, width, generator=generator)
        extent = torch.tensor([width, height], dtype=torch.float32)
        start = torch.rand(2, 6, 2, generator=generator) * extent
        boxes = torch.cat([start, start + torch.rand(2, 6, 2, generator=generator) * (extent - start)], -1)
        boxes[0, 0] = torch.tensor([0.0, 0.0, width, height])
        boxes[0, 1] = torch.tensor([2.0, 3.0, 2.2, 3.1])
        boxes[1, 0] = torch.tensor([width - 0.5, height - 0.5, width, height])
        ours = roi_pool(features, boxes, size).reshape(12, 16, size, size)
        ref = torchvision.ops.roi_align(features, [boxes.reshape(12, 4)], size)
        worst = max(worst, (ours - ref).abs().max().item())
    assert worst <= 1e-5, worst


def _chain(parts, pixels, ids, mask, boxes, labels):
    with torch.no_grad():
        *levels, _cls = parts["image_encoder"](pixels)
        text = parts["text_encoder"](ids, mask)
        geometry, geometry_mask = parts["geometry_encoder"](levels[-1], boxes, labels)
        out = parts["exemplar_decoder"](*levels, text, mask, geometry, geometry_mask)
    return dict(zip((T.PRED_MASKS, T.PRED_BOXES, T.PRED_LOGITS, T.PRESENCE_LOGITS), out))


def _prompt(with_text: bool, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids for a text prompt, or a stand-in for "visual" (what both references
    use as the text of a box-only prompt), padded with 0."""
    length = 7 if with_text else 3
    ids = torch.zeros(1, 32, dtype=torch.int32)
    ids[0, :length] = torch.randint(1, 1000, (length,), generator=generator, dtype=torch.int32)
    return ids, (ids != 0).to(torch.int32)


@pytest.fixture(scope="module")
def parts(tiny_model):
    return split_model(tiny_model, exemplars=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_exemplar_graphs_equal_transformers(tiny_model, parts, case: str) -> None:
    generator = torch.Generator().manual_seed(1)
    size = tiny_model.config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=generator)
    ids, mask = _prompt(CASES[case][2], generator)
    boxes, labels = padded(*CASES[case][:2])
    got = _chain(parts, pixels, ids, mask, boxes, labels)
    n = len(CASES[case][1])  # transformers reads only the valid boxes; no padding needed there
    with torch.no_grad():
        ref = reference_forward(tiny_model, pixels, ids, mask, boxes[:, :n], labels[:, :n])
    for name in (T.PRED_LOGITS, T.PRED_BOXES, T.PRESENCE_LOGITS, T.PRED_MASKS):
        assert (got[name] - ref[name]).abs().max().item() <= 1e-4, name


def test_no_boxes_through_exemplar_graphs_equals_text_path(parts, tiny_model) -> None:
    """All-padding rows give the cached-CLS text path's answer: one prompt list can mix both."""
    generator = torch.Generator().manual_seed(2)
    size = tiny_model.config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=generator)
    ids, mask = _prompt(True, generator)
    boxes, labels = padded([], [])
    with torch.no_grad():
        *levels, cls = parts["image_encoder"](pixels)
        text = parts["text_encoder"](ids, mask)
        text_only = parts["decoder"](*levels, cls, text, mask)
    got = _chain(parts, pixels, ids, mask, boxes, labels)
    for a, b in zip(got.values(), text_only):
        assert (a - b).abs().max().item() <= 1e-5


@pytest.fixture(scope="module")
def meta_pair(tmp_path_factory):
    """Meta's own model (random weights) and the transformers model loaded from its sam3.pt."""
    pytest.importorskip("sam3")
    pytest.importorskip("psutil")
    import json

    from export.checkpoints import load_checkpoint
    from tests.export import meta_models
    from tests.export.test_meta_export import HEADS

    meta = meta_models.build_small_meta_model(meta_models.MetaDims(), seed=0)
    directory = tmp_path_factory.mktemp("meta-ckpt")
    torch.save({"model": {f"detector.{k}": v for k, v in meta.state_dict().items()}}, directory / "sam3.pt")
    (directory / "config.json").write_text(json.dumps(HEADS))
    model = load_checkpoint(directory / "sam3.pt").model
    model.config._attn_implementation = "eager"
    return meta, model.eval()


@pytest.mark.meta
@pytest.mark.parametrize("case", sorted(CASES))
def test_exemplar_graphs_equal_metas_model(meta_pair, case: str) -> None:
    from sam3.model.box_ops import box_cxcywh_to_xyxy

    from tests.export import meta_models

    meta, model = meta_pair
    parts = split_model(model, exemplars=True)
    generator = torch.Generator().manual_seed(3)
    size = model.config.vision_config.image_size
    pixels = torch.rand(1, 3, size, size, generator=generator) * 2 - 1
    ids, mask = _prompt(CASES[case][2], generator)
    boxes, labels = padded(*CASES[case][:2])
    got = _chain(parts, pixels, ids, mask, boxes, labels)
    n = len(CASES[case][1])
    ref = meta_models.meta_forward(meta, pixels, ids.long(), boxes[0, :n], labels[0, :n] == 1)
    logits_err = (got[T.PRED_LOGITS] - ref["pred_logits"]).abs().max().item()
    presence_err = (got[T.PRESENCE_LOGITS] - ref["presence"]).abs().max().item()
    boxes_err = (got[T.PRED_BOXES] - box_cxcywh_to_xyxy(ref["pred_boxes"])).abs().max().item()
    iou = mask_iou(got[T.PRED_MASKS].numpy(), ref["pred_masks"].numpy())
    assert logits_err <= 1e-3 and presence_err <= 1e-3 and boxes_err <= 1e-3, (logits_err, presence_err, boxes_err)
    assert iou >= 0.99, iou
    assert int(np.argmax(got[T.PRED_LOGITS].numpy())) == int(np.argmax(ref["pred_logits"].numpy()))


def test_bundle_declares_and_verifies_exemplar_graphs(tiny_bundle) -> None:
    """`python -m export build` writes the two exemplar graphs, their parity (every case within
    the build's bounds), a clean TensorRT op audit and their FP16 range; the manifest says so."""
    from engines.bundle import EXEMPLAR_PART_NAMES, Bundle
    from export.verify import EXEMPLAR_PROMPTS

    manifest = Bundle(tiny_bundle).manifest
    assert manifest.max_boxes == 16
    assert manifest.capabilities == {"text_prompts": True, "exemplar_boxes": True, "max_boxes": 16}
    exemplars = manifest.parity["exemplars"]
    assert set(exemplars["end_to_end"]) == set(EXEMPLAR_PROMPTS)
    summary = exemplars["summary"]
    assert summary["logits_max_abs"] <= 1e-3 and summary["presence_max_abs"] <= 1e-3, summary
    assert summary["mask_iou_min"] >= 0.99 and summary["same_top_query"], summary
    for name in EXEMPLAR_PART_NAMES:
        assert manifest.op_audit["parts"][name]["unsupported"] == []
        assert "RoiAlign" not in manifest.op_audit["parts"][name]["ops"]
        assert name in manifest.fp16_range["parts"]
        assert manifest.part(name).max_batch == manifest.part("decoder").max_batch
    assert manifest.op_audit["all_supported"]
    assert manifest.part("geometry_encoder").input(T.INPUT_BOXES).shape == ("batch", 16, 4)


def test_bundle_without_exemplar_graphs_loads_and_serves_text(tiny_bundle, tmp_path) -> None:
    """A bundle written before exemplar prompts (no geometry graphs) still loads and segments text."""
    from engines.bundle import Bundle
    from engines.pipeline import Sam3Pipeline
    from tests.conftest import text_only_copy

    old = text_only_copy(tiny_bundle, tmp_path / "text-only")
    manifest = Bundle(old).manifest
    assert manifest.max_boxes == 0 and manifest.capabilities["exemplar_boxes"] is False
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    with Sam3Pipeline.from_bundle(old, backend="onnxruntime") as pipe:
        result = pipe.segment(image, ["a cat"], SegmentOptions(score_threshold=0.0))
    assert len(result.results) == 1
