"""The torch-free pipeline against the PyTorch reference, end to end, as a user calls it.

Reference = transformers' `Sam3Model` at the bundle's weights with Meta's semantics
(`export.split.reference_forward`), fed by an independent preprocessing (PIL EXIF transpose +
torchvision v2 antialiased resize, as Meta's processor does) and post-processed by transformers'
`Sam3ImageProcessor.post_process_instance_segmentation`.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageOps

from engines.options import SegmentOptions
from engines.bundle import TensorNames as T
from engines.pipeline import Sam3Pipeline
from engines.tokenizer import PromptTokenizer

torch = pytest.importorskip("torch")
v2 = pytest.importorskip("torchvision.transforms.v2")
image_processing = pytest.importorskip("transformers.models.sam3.image_processing_sam3")

# Random weights put scores near sigmoid(0)^2 = 0.25: a low threshold keeps detections to compare.
SCORE_THRESHOLD = 0.2


def _jpeg(pixels: np.ndarray, orientation: int | None = None) -> bytes:
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _images() -> dict[str, bytes]:
    from skimage import data

    rng = np.random.default_rng(3)
    gray = data.camera()[::2, ::3]  # 256 x 171, non-square, single channel
    rgba = np.dstack([data.chelsea(), rng.integers(0, 256, data.chelsea().shape[:2], dtype=np.uint8)])
    return {
        "astronaut_square": _jpeg(data.astronaut()),
        "coffee_landscape": _png(Image.fromarray(data.coffee())),
        "tall_synthetic": _png(Image.fromarray(rng.integers(0, 256, (300, 90, 3), dtype=np.uint8))),
        "upscaled_small": _png(Image.fromarray(data.astronaut()[::8, ::6])),  # 64 x 86 < model size
        "exif_rotated": _jpeg(data.coffee(), orientation=6),
        "grayscale": _png(Image.fromarray(gray, mode="L")),
        "rgba": _png(Image.fromarray(rgba, mode="RGBA")),
        "palette": _png(Image.fromarray(data.astronaut()).convert("P", palette=Image.Palette.ADAPTIVE)),
    }


def _reference_pixels(data: bytes, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Meta's preprocessing, written independently of engines/preprocess.py."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    resized = v2.Resize((size, size), antialias=True)(tensor)
    pixels = (resized.float() / 255.0 - 0.5) / 0.5
    return pixels[None], (image.height, image.width)


def _reference(model, data: bytes, prompts: list[str], tokenizer: PromptTokenizer, size: int):
    pixels, (height, width) = _reference_pixels(data, size)
    ids, mask = tokenizer.encode(prompts)
    from export.split import reference_forward

    with torch.no_grad():
        out = reference_forward(model, pixels, torch.from_numpy(ids), torch.from_numpy(mask))
    processor = image_processing.Sam3ImageProcessor()
    results = []
    for i in range(len(prompts)):
        outputs = SimpleNamespace(**{k: out[k][i: i + 1] for k in (T.PRED_MASKS, T.PRED_BOXES, T.PRED_LOGITS)},
                                  presence_logits=out[T.PRESENCE_LOGITS][i: i + 1])
        (res,) = processor.post_process_instance_segmentation(
            outputs, threshold=SCORE_THRESHOLD, mask_threshold=0.5, target_sizes=[(height, width)])
        order = torch.argsort(res["scores"], descending=True, stable=True)
        results.append((res["scores"][order].numpy(), res["boxes"][order].numpy(),
                        res["masks"][order].numpy().astype(bool)))
    return results, (width, height)


@pytest.fixture(scope="module")
def pipeline(tiny_bundle):
    with Sam3Pipeline.from_bundle(tiny_bundle, backend="onnxruntime") as pipe:
        yield pipe


@pytest.mark.parametrize("name", list(_images()))
@pytest.mark.parametrize("prompts", [["a photo of a cat"], ["person", "coffee cup", "a red car", "spoon"]],
                         ids=["1-prompt", "4-prompts"])
def test_pipeline_equals_reference(pipeline, tiny_model, name: str, prompts: list[str]) -> None:
    data = _images()[name]
    tokenizer = PromptTokenizer.from_bundle(pipeline.bundle)
    expected, size = _reference(tiny_model, data, prompts, tokenizer, pipeline.bundle.manifest.model.image_size)
    calls_before = pipeline.stage_calls["decoder"]
    result = pipeline.segment(data, prompts, SegmentOptions(score_threshold=SCORE_THRESHOLD))
    assert pipeline.stage_calls["decoder"] == calls_before + 1  # all prompts in one decoder call
    assert result.image_size == size
    compared = 0
    for prompt_result, (scores, boxes, masks) in zip(result.results, expected, strict=True):
        detections = prompt_result.detections
        assert len(detections) == len(scores), (name, prompt_result.prompt)
        for det, score, box, mask in zip(detections, scores, boxes, masks):
            assert abs(det.score - float(score)) <= 1e-4
            assert np.abs(np.asarray(det.box) - box).max() <= 0.5
            union = np.logical_or(det.mask, mask).sum()
            iou = 1.0 if union == 0 else np.logical_and(det.mask, mask).sum() / union
            assert iou >= 0.99, (name, prompt_result.prompt, iou)
            compared += 1
    assert compared > 0, "no detections to compare: lower SCORE_THRESHOLD"
