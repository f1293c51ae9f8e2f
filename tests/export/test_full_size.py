"""Full-size and full-depth SAM3-Small exports: minutes each, so `make test-slow` only.

docs/export-full-size.md records a run of the full-size case (14m45s, 15.9 GB peak RSS on
2 cores); these tests assert what that document claims.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.bundle import Bundle
from export.__main__ import main

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "preset, image_size, queries, params_m",
    [("full", 1008, 200, (462.1, 353.7, 24.5)), ("sam3_small", 252, 100, None)],
)
def test_preset_exports_with_parity(preset: str, image_size: int, queries: int, params_m, tmp_path: Path) -> None:
    out = tmp_path / preset
    args = ["demo", "--preset", preset, "--out", str(out), "--verify-cases", "2", "--skip-fp16-error-run"]
    assert main(args) == 0
    manifest = Bundle(out).manifest
    assert manifest.model.image_size == image_size and manifest.model.num_queries == queries
    summary = manifest.parity["summary"]
    assert summary["logits_max_abs"] <= 1e-3 and summary["mask_iou_min"] >= 0.99
    assert manifest.op_audit["all_supported"]
    # exemplar (box) prompts at this size: every case of export.verify.EXEMPLAR_PROMPTS
    exemplars = manifest.parity["exemplars"]["summary"]
    assert manifest.max_boxes == 16 and exemplars["cases"] == 5
    assert exemplars["logits_max_abs"] <= 1e-3 and exemplars["presence_max_abs"] <= 1e-3
    assert exemplars["mask_iou_min"] >= 0.99 and exemplars["same_top_query"]
    assert "geometry_encoder" in manifest.fp16_range["parts"]
    if params_m is not None:
        counted = tuple(round(manifest.model.parameters[p] / 1e6, 1)
                        for p in ("image_encoder", "text_encoder", "decoder"))
        assert counted == params_m
