"""`python -m export quantize`: an opt-in int8 CPU bundle that runs, says what it cost, and
cannot be mistaken for the fp32 one."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from engines.options import SegmentOptions
from engines.bundle import Bundle
from engines.errors import BackendUnavailable
from engines.factory import open_backend
from engines.pipeline import Sam3Pipeline
from export.__main__ import main


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "tiny-int8"
    assert main(["quantize", str(tiny_bundle), "--out", str(out)]) == 0
    return out


def test_int8_bundle_records_its_parity_cost_and_identity(int8_bundle: Path, tiny_bundle: Path) -> None:
    base, int8 = Bundle(tiny_bundle).manifest, Bundle(int8_bundle).manifest
    quantization = int8.export["quantization"]
    assert quantization["cpu_only"] and quantization["parts"] == ["image_encoder"]
    summary = int8.parity["int8_vs_fp32"]["summary"]
    assert summary["cases"] == 5 and 0 < summary["logits_max_abs"] < 0.1 and summary["mask_iou_min"] > 0.5
    # a new image-encoder identity (no embedding-cache sharing with fp32), the rest unchanged
    assert int8.part("image_encoder").weights_sha256 != base.part("image_encoder").weights_sha256
    assert int8.part("decoder").weights_sha256 == base.part("decoder").weights_sha256
    ops = {n.op_type for n in onnx.load(str(int8_bundle / "image_encoder.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeLinear" in ops
    assert not int8.op_audit["all_supported"]  # honest: TensorRT cannot build it


def test_int8_bundle_segments_on_onnxruntime(int8_bundle: Path) -> None:
    from skimage import data

    with Sam3Pipeline.from_bundle(int8_bundle, backend="auto") as pipe:
        assert pipe.backend.kind == "onnxruntime"
        result = pipe.segment(data.astronaut(), ["person", "a red car"], SegmentOptions(score_threshold=0.0, max_detections=3))
    assert [len(r.detections) for r in result.results] == [3, 3]


def test_tensorrt_refuses_an_int8_bundle(int8_bundle: Path) -> None:
    with pytest.raises(BackendUnavailable, match="int8"):
        open_backend(int8_bundle, "tensorrt")


def test_quantizing_twice_is_refused(int8_bundle: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "again"
    assert main(["quantize", str(int8_bundle), "--out", str(out)]) == 1
    assert "already quantized" in capsys.readouterr().err
    assert not out.exists()
