"""python -m export emulate-fp16: a CPU copy of a bundle that rounds like a TensorRT FP16 engine."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from engines.bundle import Bundle
from engines.errors import BackendUnavailable
from engines.factory import is_cpu_only, resolve_backend
from engines.pipeline import Sam3Pipeline
from export.__main__ import main
from export.fp16_emulation import PINNED_OP_TYPES
from tests.server.conftest import image_bytes


@pytest.fixture(scope="module")
def emulated(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("emu") / "tiny-fp16emu"
    assert main(["emulate-fp16", str(tiny_bundle), "--out", str(out)]) == 0
    return out


def test_weights_are_fp16_values_and_layer_outputs_pass_through_fp16(emulated) -> None:
    bundle = Bundle(emulated)
    assert bundle.manifest.export["quantization"]["kind"] == "fp16-emulation" and is_cpu_only(bundle.manifest)
    for name in bundle.manifest.parts:
        graph = onnx.load(str(bundle.part_path(name))).graph
        for init in graph.initializer:
            array = numpy_helper.to_array(init)
            if array.dtype == np.float32:
                assert np.array_equal(array, array.astype(np.float16).astype(np.float32)), init.name
        casts = [n for n in graph.node if n.op_type == "Cast" and n.output[0].endswith("__fp16")]
        producers = {out: n for n in graph.node for out in n.output}
        assert casts, name
        for cast in casts:  # every rounding follows a layer that TensorRT would not keep in FP32
            assert producers[cast.input[0]].op_type not in PINNED_OP_TYPES


def test_tensorrt_refuses_it_and_its_answers_are_close_but_not_equal(tiny_bundle, emulated) -> None:
    with pytest.raises(BackendUnavailable):
        resolve_backend(Bundle(emulated).manifest, "tensorrt", present={"tensorrt": True})
    image = image_bytes(seed=3, width=200, height=150)
    prompts = ["a cat", "a red car"]
    with Sam3Pipeline.from_bundle(tiny_bundle, "onnxruntime") as fp32, \
            Sam3Pipeline.from_bundle(emulated, "onnxruntime") as fp16:
        a = fp32.encode_image(image)
        b = fp16.encode_image(image)
    for name, value in a.tensors.items():
        diff = float(np.abs(value - b.tensors[name]).max())
        assert 0 < diff < 0.05 * max(float(np.abs(value).max()), 1.0), (name, diff)


def test_refuses_a_quantized_bundle(emulated, tmp_path, capsys) -> None:
    assert main(["emulate-fp16", str(emulated), "--out", str(tmp_path / "again")]) == 1
    assert "already quantized or emulated" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
