"""The exporter takes the configs transformers runs, built the way transformers' own tests build
them (tests/models/sam3/test_modeling_sam3.py, ``Sam3ModelTester.get_config``): sub-config
objects, a smaller ``image_size`` that leaves the 1008 px ``backbone_feature_sizes`` default in
place, and that tester's two FPN scales. Each model is saved with ``save_pretrained`` and
exported with ``python -m export build``, then run by the torch-free pipeline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.model_config import UnsupportedConfig, fpn_sizes

STALE = [[288, 288], [144, 144], [72, 72]]  # Sam3VisionConfig's default, for 1008 px


def transformers_test_config(*, scale_factors=None, vocab_size: int = 49408, image_size: int = 224):
    """``Sam3ModelTester.get_config`` with its defaults (scale_factors None: the model's four).

    One change: the tester's text vocabulary is 1000 (it feeds random ids below 1000); a bundle
    ships the CLIP tokenizer, whose ids reach 49407 (the 1000 case is tested to fail below).
    """
    from transformers.models.sam3.configuration_sam3 import (
        Sam3Config,
        Sam3DETRDecoderConfig,
        Sam3DETREncoderConfig,
        Sam3GeometryEncoderConfig,
        Sam3MaskDecoderConfig,
        Sam3VisionConfig,
        Sam3ViTConfig,
    )

    backbone_config = Sam3ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_channels=3,
        image_size=image_size, patch_size=14, window_size=8, global_attn_indexes=[0, 1],
    )  # fmt: skip
    vision_config = Sam3VisionConfig(backbone_config=backbone_config, fpn_hidden_size=32, scale_factors=scale_factors)
    text_config = {
        "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 32, "hidden_act": "gelu",
    }  # fmt: skip
    return Sam3Config(
        vision_config=vision_config,
        text_config=text_config,
        geometry_encoder_config=Sam3GeometryEncoderConfig(
            hidden_size=32, num_layers=1, num_attention_heads=4, intermediate_size=64,
            mask_fuser_hidden_size=32, mask_fuser_num_layers=1,
        ),  # fmt: skip
        detr_encoder_config=Sam3DETREncoderConfig(hidden_size=32, num_layers=1, num_attention_heads=4, intermediate_size=64),
        detr_decoder_config=Sam3DETRDecoderConfig(
            hidden_size=32, num_layers=1, num_queries=5, num_attention_heads=4, intermediate_size=64
        ),
        mask_decoder_config=Sam3MaskDecoderConfig(hidden_size=32, num_upsampling_stages=2),
    )


def _export(config, tmp_path: Path) -> tuple[int, Path]:
    import torch
    from transformers import Sam3Model

    from export.__main__ import main

    torch.manual_seed(0)
    checkpoint = tmp_path / "checkpoint"
    Sam3Model(config).eval().save_pretrained(checkpoint)
    out = tmp_path / "bundle"
    code = main(["build", "--checkpoint", str(checkpoint), "--out", str(out), "--name", "transformers-test",
                 "--verify-cases", "1", "--skip-fp16-check"])  # fmt: skip
    return code, out


def _segments(bundle: Path, mask_size: tuple[int, int]) -> None:
    from engines.options import SegmentOptions
    from engines.pipeline import Sam3Pipeline

    with Sam3Pipeline.from_bundle(bundle, "onnxruntime") as pipe:
        assert pipe.manifest.model.mask_size == mask_size
        result = pipe.segment(np.full((90, 120, 3), 127, np.uint8), ["a cat", "a dog"], SegmentOptions(score_threshold=0.0))
    assert [len(r.detections) for r in result.results] == [5, 5]
    assert result.results[0].detections[0].mask.shape == (90, 120)


def test_stale_backbone_feature_sizes_are_ignored_with_a_note(tmp_path: Path, capsys) -> None:
    from engines.bundle import Bundle

    config = transformers_test_config()
    assert config.vision_config.backbone_feature_sizes == STALE  # what transformers leaves there
    code, out = _export(config, tmp_path)
    assert code == 0, capsys.readouterr().err
    manifest = Bundle(out).manifest
    (note,) = manifest.export["config_notes"]
    assert "backbone_feature_sizes [[288, 288], [144, 144], [72, 72]] ignored" in note
    assert "[[64, 64], [32, 32], [16, 16]]" in note and "note: " in capsys.readouterr().out
    assert manifest.part("image_encoder").output_names == ("fpn_0", "fpn_1", "fpn_2", "geometry_cls")
    _segments(out, (64, 64))


def test_two_fpn_scales_export_with_one_level(tmp_path: Path, capsys) -> None:
    """The tester's own scale set, [2.0, 1.0]: Sam3Model drops the last level, so one is used."""
    from engines.bundle import Bundle

    code, out = _export(transformers_test_config(scale_factors=[2.0, 1.0]), tmp_path)
    assert code == 0, capsys.readouterr().err
    manifest = Bundle(out).manifest
    assert manifest.part("image_encoder").output_names == ("fpn_0", "geometry_cls")
    assert manifest.part("decoder").input_names[:2] == ("fpn_0", "geometry_cls")
    assert manifest.part("image_encoder").output("fpn_0").shape[2:] == (32, 32)  # 2x the 16-patch grid
    assert manifest.parity["summary"]["mask_iou_min"] > 0.99
    _segments(out, (32, 32))


def test_a_config_the_graphs_cannot_run_names_the_reason(tmp_path: Path, capsys) -> None:
    code, out = _export(transformers_test_config(vocab_size=1000), tmp_path)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and not out.exists()
    assert len(errors) == 1 and "text_config.vocab_size 1000 is smaller than the CLIP tokenizer" in errors[0]


@pytest.mark.parametrize(
    "image_size, scales, sizes",
    [
        (1008, None, STALE),
        (224, [2.0, 1.0], [[32, 32]]),
        (252, [4.0, 2.0, 1.0, 0.5], [[72, 72], [36, 36], [18, 18]]),
        (126, [1.0, 0.5, 0.5], [[9, 9], [4, 4]]),  # 2x2 max pool floors an odd grid
    ],
)
def test_fpn_sizes_as_the_model_computes_them(image_size, scales, sizes) -> None:
    assert fpn_sizes(image_size, 14, scales) == sizes


@pytest.mark.parametrize(
    "scales, reason",
    [([3.0, 1.0], "builds only 4.0, 2.0, 1.0 and 0.5"), ([1.0], "leaves no FPN level")],
)
def test_fpn_scale_sets_transformers_cannot_build(scales, reason) -> None:
    with pytest.raises(UnsupportedConfig, match=reason):
        fpn_sizes(224, 14, scales)


def test_too_few_mask_decoder_stages_name_the_reason() -> None:
    from transformers.models.sam3.configuration_sam3 import Sam3MaskDecoderConfig

    from export.model_config import check_exportable

    config = transformers_test_config()  # three levels used
    config.mask_decoder_config = Sam3MaskDecoderConfig(hidden_size=32, num_upsampling_stages=1)
    with pytest.raises(UnsupportedConfig, match="num_upsampling_stages 1 cannot merge 3 FPN levels"):
        check_exportable(config)
