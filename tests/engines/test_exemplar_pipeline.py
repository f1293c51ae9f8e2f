"""Exemplar (box) prompts through the torch-free pipeline, as a user calls it.

Reference: transformers' `Sam3Model` with `input_boxes`/`input_boxes_labels` (Meta's semantics:
box-only prompts get the text "visual"), boxes converted from pixel xyxy here, independently of
the pipeline, and post-processed by transformers' `Sam3ImageProcessor`.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from engines.options import SegmentOptions
from engines.bundle import TensorNames as T
from engines.errors import ExemplarsUnsupported, InvalidBox
from engines.pipeline import Sam3Pipeline
from engines.types import ExemplarBox, Prompt

torch = pytest.importorskip("torch")
v2 = pytest.importorskip("torchvision.transforms.v2")
image_processing = pytest.importorskip("transformers.models.sam3.image_processing_sam3")

SCORE_THRESHOLD = 0.2
WIDTH, HEIGHT = 160, 120

PROMPTS = {
    "one_positive": Prompt(boxes=(ExemplarBox((20, 30, 70, 90)),)),
    "three_positive": Prompt(boxes=(ExemplarBox((10, 10, 40, 40)), ExemplarBox((60, 20, 150, 100)),
                                            ExemplarBox((0, 0, 160, 120)))),
    "positive_and_negative": Prompt(boxes=(ExemplarBox((20, 30, 70, 90)),
                                                   ExemplarBox((100, 60, 140, 110), positive=False))),
    "text_and_box": Prompt(text="a red car", boxes=(ExemplarBox((20, 30, 70, 90)),)),
    "text_and_negative": Prompt(text="a red car", boxes=(ExemplarBox((5, 5, 25, 30), positive=False),)),
}


def _image() -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _reference(model, tokenizer, prompt: Prompt, size: int):
    from export.split import reference_forward

    image = Image.open(io.BytesIO(_image())).convert("RGB")
    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    pixels = ((v2.Resize((size, size), antialias=True)(tensor).float() / 255.0 - 0.5) / 0.5)[None]
    ids, mask = tokenizer.encode([prompt.text or "visual"])
    boxes = torch.tensor([[[(x0 + x1) / 2 / WIDTH, (y0 + y1) / 2 / HEIGHT, (x1 - x0) / WIDTH, (y1 - y0) / HEIGHT]
                           for x0, y0, x1, y1 in (b.box for b in prompt.boxes)]], dtype=torch.float32)
    labels = torch.tensor([[1 if b.positive else 0 for b in prompt.boxes]])
    with torch.no_grad():
        out = reference_forward(model, pixels, torch.from_numpy(ids), torch.from_numpy(mask), boxes, labels)
    outputs = SimpleNamespace(**{k: out[k] for k in (T.PRED_MASKS, T.PRED_BOXES, T.PRED_LOGITS)},
                              presence_logits=out[T.PRESENCE_LOGITS])
    (res,) = image_processing.Sam3ImageProcessor().post_process_instance_segmentation(
        outputs, threshold=SCORE_THRESHOLD, mask_threshold=0.5, target_sizes=[(HEIGHT, WIDTH)])
    order = torch.argsort(res["scores"], descending=True, stable=True)
    return res["scores"][order].numpy(), res["boxes"][order].numpy(), res["masks"][order].numpy().astype(bool)


@pytest.fixture(scope="module")
def pipeline(tiny_bundle):
    with Sam3Pipeline.from_bundle(tiny_bundle, backend="onnxruntime") as pipe:
        yield pipe


def test_pipeline_exemplars_equal_reference(pipeline, tiny_model) -> None:
    """All five prompts in one request: each equals transformers' answer for it alone."""
    from engines.tokenizer import PromptTokenizer

    tokenizer = PromptTokenizer.from_bundle(pipeline.bundle)
    result = pipeline.segment(_image(), list(PROMPTS.values()), SegmentOptions(score_threshold=SCORE_THRESHOLD))
    assert [r.prompt for r in result.results] == ["visual"] * 3 + ["a red car"] * 2
    compared = 0
    for name, prompt_result in zip(PROMPTS, result.results, strict=True):
        scores, boxes, masks = _reference(tiny_model, tokenizer, PROMPTS[name],
                                          pipeline.manifest.model.image_size)
        assert len(prompt_result.detections) == len(scores), name
        for det, score, box, mask in zip(prompt_result.detections, scores, boxes, masks):
            assert abs(det.score - float(score)) <= 1e-4, name
            assert np.abs(np.asarray(det.box) - box).max() <= 0.5, name
            union = np.logical_or(det.mask, mask).sum()
            assert (np.logical_and(det.mask, mask).sum() / union if union else 1.0) >= 0.99, name
            compared += 1
    assert compared > 0, "no detections to compare: lower SCORE_THRESHOLD"


def test_new_box_on_cached_image_runs_only_geometry_encoder_and_decoder(pipeline) -> None:
    image = pipeline.encode_image(_image())
    pipeline.segment(image, [PROMPTS["one_positive"]])  # the first box-only prompt encodes "visual"
    before = dict(pipeline.stage_calls)
    result = pipeline.segment(image, [PROMPTS["positive_and_negative"]])
    ran = {stage: pipeline.stage_calls[stage] - before.get(stage, 0) for stage in pipeline.stage_calls}
    assert {k: v for k, v in ran.items() if v} == {"geometry_encoder": 1, "decoder": 1}
    assert result.cache_hit and result.timings_ms["image_encoder"] == 0 and result.timings_ms["text_encoder"] == 0
    assert result.timings_ms["geometry_encoder"] > 0


def test_one_call_mixes_text_and_box_prompts(pipeline) -> None:
    """Text-only prompts take the text path (no geometry graph), boxed ones the exemplar path,
    in one call, answered in the call's order; each equals the same prompt asked alone."""
    image = pipeline.encode_image(_image())
    options = SegmentOptions(score_threshold=0.0, max_detections=5)
    boxed = PROMPTS["one_positive"]
    before = dict(pipeline.stage_calls)
    mixed = pipeline.segment(image, ["a red car", boxed, Prompt(text="a cat")], options)
    ran = {stage: pipeline.stage_calls[stage] - before.get(stage, 0) for stage in pipeline.stage_calls}
    assert {k: v for k, v in ran.items() if v} == {"text_encoder": 1, "geometry_encoder": 1, "decoder": 2}
    assert [r.prompt for r in mixed.results] == ["a red car", "visual", "a cat"]
    text_alone = pipeline.segment(image, ["a red car", "a cat"], options).results
    box_alone = pipeline.segment(image, [boxed], options).results
    for got, expected in zip(mixed.results, [text_alone[0], box_alone[0], text_alone[1]], strict=True):
        assert [d.score for d in got.detections] == pytest.approx([d.score for d in expected.detections], abs=1e-5)
        np.testing.assert_allclose([d.box for d in got.detections], [d.box for d in expected.detections], atol=1e-3)


@pytest.mark.parametrize("boxes, text, message", [
    (((10, 10, 10, 40),), None, "degenerate"),
    (((30, 10, 20, 40),), None, "degenerate"),
    (((-1, 10, 20, 40),), None, "outside"),
    (((10, 10, 20, WIDTH),), None, "outside"),
    (((10, 10, 20, 30),) * 17, None, "at most 16"),
    (((float("nan"), 10, 20, 30),), None, "finite"),
])
def test_refused_boxes(pipeline, boxes, text, message) -> None:
    prompt = Prompt(text=text, boxes=tuple(ExemplarBox(b) for b in boxes))
    with pytest.raises(InvalidBox, match=message):
        pipeline.check_prompts([prompt], pipeline.load_image(_image()).size)


def test_negative_only_needs_text(pipeline) -> None:
    negative = (ExemplarBox((10, 10, 50, 50), positive=False),)
    size = pipeline.load_image(_image()).size
    with pytest.raises(InvalidBox, match="negative boxes need"):
        pipeline.check_prompts([Prompt(boxes=negative)], size)
    pipeline.check_prompts([Prompt(text="a cat", boxes=negative)], size)


def test_box_bounds_are_checked_once_the_image_is_known(pipeline) -> None:
    """A caller that checks before decoding (the server) gets every check but the bounds; the
    bounds are checked by segment against the image, and nothing else again."""
    outside = Prompt(boxes=(ExemplarBox((10, 10, 20, WIDTH + 5)),))
    checked = pipeline.check_prompts([outside])
    assert checked.image_size is None and checked.texts == ("visual",)
    runs = pipeline.stage_calls["image_encoder"]
    with pytest.raises(InvalidBox, match="outside"):
        pipeline.segment(pipeline.load_image(_image()), checked)
    assert pipeline.stage_calls["image_encoder"] == runs  # refused before the encoder ran


def test_bundle_without_exemplar_graphs_refuses_boxes(tiny_bundle, tmp_path) -> None:
    from tests.conftest import text_only_copy

    old = text_only_copy(tiny_bundle, tmp_path / "text-only")
    with Sam3Pipeline.from_bundle(old, backend="onnxruntime") as pipe:
        assert pipe.describe()["exemplars"]["max_boxes"] == 0
        with pytest.raises(ExemplarsUnsupported, match="no exemplar graphs"):
            pipe.segment(_image(), [PROMPTS["one_positive"]])
        assert pipe.segment(_image(), [Prompt(text="a cat")]).results


def test_tensorrt_plans_and_profiles_for_the_exemplar_graphs(tiny_bundle, tmp_path) -> None:
    """Pure build logic (no GPU): the exemplar graphs get plans and a batch profile; K is fixed
    in the graph (padded), so min = opt = max on the box axis."""
    from engines.bundle import Bundle
    from engines.tensorrt_build import plan_path, profile_shapes

    manifest = Bundle(tiny_bundle).manifest
    spec = manifest.part("geometry_encoder")
    shapes = profile_shapes(spec, spec.max_batch)
    assert shapes[T.INPUT_BOXES] == ((1, 16, 4), (1, 16, 4), (spec.max_batch, 16, 4))
    assert set(shapes) == {T.INPUT_BOXES, T.INPUT_BOXES_LABELS}  # the image level is fixed, batch 1
    decoder = profile_shapes(manifest.part("exemplar_decoder"), 8)
    assert decoder[T.GEOMETRY_FEATURES][2][:2] == (8, 17)
    assert plan_path(tmp_path, "exemplar_decoder", "0" * 16).name.startswith("exemplar_decoder.")


def test_cli_segment_with_boxes(tiny_bundle, tmp_path, capsys) -> None:
    from engines.__main__ import main

    image = tmp_path / "scene.png"
    image.write_bytes(_image())
    out = tmp_path / "result.json"
    code = main(["segment", str(tiny_bundle), str(image), "--box", "20,30,70,90", "--negative-box",
                 "100,60,140,110", "--backend", "onnxruntime", "--score-threshold", "0", "--json", str(out)])
    assert code == 0
    assert "'visual'" in capsys.readouterr().out
    assert main(["segment", str(tiny_bundle), str(image), "--box", "20,30,10,90",
                 "--backend", "onnxruntime"]) == 1
    assert "invalid_box" in capsys.readouterr().err


def test_bench_reports_warm_box_cost_next_to_warm_text_cost(tiny_bundle, capsys) -> None:
    from engines.__main__ import main

    assert main(["bench", str(tiny_bundle), "--backend", "onnxruntime", "--iterations", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "decode (cached)" in out and "1 box (cached)" in out


def test_check_command_covers_the_exemplar_graphs(tiny_bundle, tmp_path, monkeypatch, capsys) -> None:
    """`python -m engines check` off-device: ONNX Runtime stands in for TensorRT, so the feeds
    for every graph (the exemplar ones included) are exercised; on a GPU it compares TensorRT."""
    import json

    import engines.__main__ as cli
    from engines.factory import open_backend

    monkeypatch.setattr(cli, "open_backend", lambda bundle, kind, **kw: open_backend(
        bundle, "onnxruntime", providers=["CPUExecutionProvider"]))
    report = tmp_path / "check.json"
    assert cli.main(["check", str(tiny_bundle), "--precision", "fp32", "--json", str(report)]) == 0
    parts = json.loads(report.read_text())["parts"]
    assert set(parts) == {"image_encoder", "text_encoder", "decoder", "geometry_encoder", "exemplar_decoder"}
    assert "PASSED" in capsys.readouterr().out
