"""Meta-format checkpoints through the real CLI, checked against Meta's own model.

The independent reference here is a small model assembled from Meta's `sam3` package classes
(tests/export/meta_models.py): its state_dict is saved in the `sam3.pt` and trainer layouts,
exported with `python -m export build`, and the ONNX chain (ONNX Runtime) must match Meta's
forward on the same image and prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.bundle import Bundle, TensorNames as T
from engines.preprocess import to_pixel_values
from engines.tokenizer import PromptTokenizer
from export.__main__ import main
from export.verify import (PromptCase, build_exemplar_cases, mask_iou, ort_session, run_chain,
                           run_exemplar_chain, sample_photos)

from tests.export import meta_models

HEADS = {  # what the weights cannot tell about MetaDims(): a config.json beside sam3.pt gives it
    s: {"num_attention_heads": 2}
    for s in ("text_config", "geometry_encoder_config", "detr_encoder_config", "mask_decoder_config")
}
FAST = ["--skip-fp16-check", "--verify-cases", "2"]


@pytest.fixture(scope="module")
def meta_model():
    pytest.importorskip("sam3")
    pytest.importorskip("psutil")
    return meta_models.build_small_meta_model(meta_models.MetaDims(), seed=0)


def _save(meta_model, layout: str, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    state = meta_model.state_dict()
    if layout == "sam3.pt":
        path = directory / "sam3.pt"
        torch.save({"model": {f"detector.{k}": v for k, v in state.items()}}, path)
    else:
        path = directory / "checkpoint.pt"
        torch.save({"model": state, "optimizer": {"state": {}}, "epoch": 3}, path)
    (directory / "config.json").write_text(json.dumps(HEADS))
    return path


@pytest.mark.meta
@pytest.mark.parametrize("layout", ["sam3.pt", "trainer"])
def test_meta_checkpoint_exports_and_matches_metas_model(meta_model, layout, tmp_path: Path) -> None:
    checkpoint = _save(meta_model, layout, tmp_path / "ckpt")
    out = tmp_path / "bundle"
    assert main(["build", "--checkpoint", str(checkpoint), "--out", str(out), *FAST]) == 0
    bundle = Bundle(out)
    assert bundle.manifest.source.format == ("meta" if layout == "sam3.pt" else "meta-trainer")

    tokenizer = PromptTokenizer.from_bundle(bundle)
    pixels = to_pixel_values(sample_photos()["astronaut"], bundle.manifest.preprocessing)
    ids, mask = tokenizer.encode(["a photo of a cat"])
    assert np.array_equal(mask, (ids != 0).astype(np.int32))  # Meta masks with tokens != 0
    sessions = {p: ort_session(bundle.part_path(p)) for p in ("image_encoder", "text_encoder", "decoder")}
    got = run_chain(sessions, PromptCase("astronaut", torch.from_numpy(pixels), torch.from_numpy(ids),
                                         torch.from_numpy(mask)))
    ref = meta_models.meta_forward(meta_model, torch.from_numpy(pixels), torch.from_numpy(ids).long())

    from sam3.model.box_ops import box_cxcywh_to_xyxy  # Meta's boxes are cxcywh; ours xyxy

    logits_err = np.abs(got[T.PRED_LOGITS] - ref["pred_logits"].numpy()).max()
    presence_err = np.abs(got[T.PRESENCE_LOGITS] - ref["presence"].numpy()).max()
    boxes_err = np.abs(got[T.PRED_BOXES] - box_cxcywh_to_xyxy(ref["pred_boxes"]).numpy()).max()
    iou = mask_iou(got[T.PRED_MASKS], ref["pred_masks"].numpy())
    assert logits_err <= 1e-3 and presence_err <= 1e-3, (logits_err, presence_err)
    assert boxes_err <= 1e-3, boxes_err
    assert iou >= 0.99, iou
    assert got[T.PRED_LOGITS].argmax() == ref["pred_logits"].numpy().argmax()

    # Exemplar (box) prompts through the same bundle vs Meta's add_geometric_prompt path
    sessions.update({p: ort_session(bundle.part_path(p)) for p in ("geometry_encoder", "exemplar_decoder")})
    cases = build_exemplar_cases(torch.from_numpy(pixels), tokenizer.encode, bundle.manifest.max_boxes)
    for case in cases:
        got = run_exemplar_chain(sessions, case)
        n = case.count
        ref = meta_models.meta_forward(meta_model, case.pixel_values, case.input_ids.long(),
                                       case.boxes[0, :n], case.labels[0, :n] == 1)
        errors = (np.abs(got[T.PRED_LOGITS] - ref["pred_logits"].numpy()).max(),
                  np.abs(got[T.PRESENCE_LOGITS] - ref["presence"].numpy()).max(),
                  np.abs(got[T.PRED_BOXES] - box_cxcywh_to_xyxy(ref["pred_boxes"]).numpy()).max())
        assert max(errors) <= 1e-3, (case.name, errors)
        assert mask_iou(got[T.PRED_MASKS], ref["pred_masks"].numpy()) >= 0.99, case.name
        assert got[T.PRED_LOGITS].argmax() == ref["pred_logits"].numpy().argmax(), case.name


def _small_shape_model():
    """SAM3-Small's widths and 252 px input, with depth cut so the test stays fast."""
    from export.presets import preset_dict
    from transformers import Sam3Config, Sam3Model

    data = preset_dict("sam3_small")
    data.pop("model_type")
    backbone = data["vision_config"]["backbone_config"]
    backbone.update(num_hidden_layers=2, global_attn_indexes=[1])
    data["text_config"].update(num_hidden_layers=1)
    data["detr_encoder_config"] = {"num_layers": 1}
    data["detr_decoder_config"] = {"num_layers": 2, "num_queries": 100}
    config = Sam3Config(**data)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return Sam3Model(config).eval(), data


@pytest.fixture(scope="module")
def small_shape():
    return _small_shape_model()


@pytest.mark.parametrize("layout", ["hf", "sam3.pt"])
def test_sam3_small_shape_exports_from_both_formats(small_shape, layout, tmp_path: Path) -> None:
    from export.checkpoints import hf_to_meta_state_dict

    model, data = small_shape
    if layout == "hf":
        checkpoint = tmp_path / "sam3-small-hf"
        model.save_pretrained(checkpoint)
        extra: list[str] = []
    else:
        checkpoint = tmp_path / "sam3_small.pt"
        meta = hf_to_meta_state_dict(model.state_dict())
        torch.save({f"detector.{k}": v for k, v in meta.items()}, checkpoint)
        # what the weights cannot tell (heads, global layers) comes from a config file + the CLI flag
        config = tmp_path / "small-config.json"
        config.write_text(json.dumps(data))
        extra = ["--config", str(config), "--image-size", "252"]
    out = tmp_path / "bundle"
    assert main(["build", "--checkpoint", str(checkpoint), "--out", str(out), *FAST, *extra]) == 0
    manifest = Bundle(out).manifest
    assert manifest.model.image_size == 252 and manifest.model.num_queries == 100
    assert manifest.model.mask_size == (72, 72)
    assert manifest.part("decoder").output(T.PRED_MASKS).shape[1:] == (100, 72, 72)
    assert manifest.parity["summary"]["mask_iou_min"] >= 0.99
