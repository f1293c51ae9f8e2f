"""ONNX Runtime backend on a toy bundle built here with onnx.helper: options, providers, validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from engines.backend import cpu_count, validate_inputs
from engines.bundle import (
    BATCH,
    Bundle,
    Manifest,
    ModelInfo,
    PartSpec,
    Preprocessing,
    SourceInfo,
    TensorSpec,
    TokenizerInfo,
    sha256_file,
    write_manifest,
)
from engines.errors import BackendUnavailable, EngineError
from engines.factory import open_backend
from engines.onnxruntime import (
    CPU_EP,
    CUDA_EP,
    TENSORRT_EP,
    OnnxRuntimeBackend,
    preferred_providers,
    provider_options,
    session_options,
)
from engines.tensorrt_build import tensorrt_installed

# Not find_spec: tensorrt-stubs (requirements/dev.txt) installs a stub-only `tensorrt` directory.
HAS_TENSORRT = tensorrt_installed()

X = TensorSpec("x", "float32", (BATCH, 3))
M = TensorSpec("m", "int32", (BATCH, 3))
BIAS = TensorSpec("bias", "float32", (1, 3))  # a fixed-batch input, like the decoder's image features
Y = TensorSpec("y", "float32", (BATCH, 3))


def _toy_graph(path: Path) -> None:
    """y = x + float(m) + bias: one float, one int and one fixed-shape input, like the real parts."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["m"], ["m_float"], to=TensorProto.FLOAT, name="cast_mask"),
            helper.make_node("Add", ["x", "m_float"], ["xm"], name="add_mask"),
            helper.make_node("Add", ["xm", "bias"], ["y"], name="add_bias"),
        ],
        "toy",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, 3]),
            helper.make_tensor_value_info("m", TensorProto.INT32, [BATCH, 3]),
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _spec(name: str, root: Path, max_batch: int = 4) -> PartSpec:
    return PartSpec(
        name=name,
        file="toy.onnx",
        sha256=sha256_file(root / "toy.onnx"),
        inputs=(X, M, BIAS),
        outputs=(Y,),
        weights_sha256="w" * 64,
        max_batch=max_batch,
    )


@pytest.fixture()
def toy_bundle(tmp_path: Path) -> Bundle:
    """A structurally valid bundle whose three parts are the toy graph (enough for the backend)."""
    _toy_graph(tmp_path / "toy.onnx")
    (tmp_path / "tokenizer.json").write_text("{}")
    manifest = Manifest(
        name="toy",
        model=ModelInfo("sam3", 28, 14, 3, 2, (8, 8)),
        preprocessing=Preprocessing(image_size=28),
        tokenizer=TokenizerInfo("tokenizer.json", sha256_file(tmp_path / "tokenizer.json"), 32, 0, 1, 2),
        parts={name: _spec(name, tmp_path) for name in ("image_encoder", "text_encoder", "decoder")},
        source=SourceInfo("toy", "0" * 64, "demo"),
    )
    write_manifest(tmp_path, manifest)
    return Bundle(tmp_path)


def _inputs(batch: int = 2) -> dict[str, np.ndarray]:
    return {
        "x": np.arange(batch * 3, dtype=np.float32).reshape(batch, 3),
        "m": np.ones((batch, 3), dtype=np.int32),
        "bias": np.full((1, 3), 10.0, dtype=np.float32),
    }


# ------------------------------------------------------------------ provider and session choices


def test_providers_ordered_tensorrt_cuda_cpu() -> None:
    available = [CPU_EP, "AzureExecutionProvider", CUDA_EP, TENSORRT_EP]
    assert preferred_providers(available) == [TENSORRT_EP, CUDA_EP, CPU_EP]
    assert preferred_providers([CUDA_EP, CPU_EP]) == [CUDA_EP, CPU_EP]
    assert preferred_providers(["AzureExecutionProvider"]) == [CPU_EP]


def test_cpu_session_options_disable_spinning_and_use_all_cores() -> None:
    options = session_options([CPU_EP])
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == cpu_count()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert session_options([CPU_EP], threads=1).intra_op_num_threads == 1


def test_gpu_session_options_leave_cpu_threading_alone() -> None:
    options = session_options([CUDA_EP, CPU_EP])
    assert options.intra_op_num_threads == 0  # ORT default
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_tensorrt_ep_gets_a_batch_profile_from_the_manifest(toy_bundle: Bundle) -> None:
    spec = toy_bundle.part("decoder")
    options = provider_options(TENSORRT_EP, toy_bundle.engines_dir, spec)
    assert options["trt_fp16_enable"] is True
    assert options["trt_profile_min_shapes"] == "x:1x3,m:1x3"
    assert options["trt_profile_max_shapes"] == "x:4x3,m:4x3"  # fixed-shape "bias" needs no profile
    assert options["trt_engine_cache_path"].startswith(str(toy_bundle.engines_dir))
    assert provider_options(CPU_EP, toy_bundle.engines_dir, spec) == {}


# ------------------------------------------------------------------ the backend


def test_onnxruntime_backend_runs_a_part(toy_bundle: Bundle) -> None:
    backend = open_backend(toy_bundle, "onnxruntime", threads=1)
    assert isinstance(backend, OnnxRuntimeBackend)
    assert backend.kind == "onnxruntime" and backend.precision == "fp32"
    assert backend.device == "cpu (1 threads)"
    part = backend.load("decoder")
    assert backend.load("decoder") is part  # one session per part
    out = part.run(_inputs(batch=3))
    assert set(out) == {"y"}
    np.testing.assert_array_equal(out["y"], _inputs(3)["x"] + 11.0)
    report = backend.memory()
    assert report.host_rss_bytes and report.host_rss_bytes > 0
    assert report.parts["decoder"] == (toy_bundle.root / "toy.onnx").stat().st_size
    assert backend.describe()["providers"] == [CPU_EP]
    backend.close()


def test_auto_is_onnxruntime_without_tensorrt(toy_bundle: Bundle) -> None:
    if HAS_TENSORRT:
        pytest.skip("tensorrt is installed: auto may pick it")
    assert open_backend(toy_bundle, "auto").kind == "onnxruntime"
    # a TensorRT precision request (the container sets fp16) does not break the fallback ...
    assert open_backend(toy_bundle, "auto", precision="fp16").precision == "fp32"


def test_explicit_tensorrt_without_it_is_backend_unavailable(toy_bundle: Bundle) -> None:
    if HAS_TENSORRT:
        pytest.skip("tensorrt is installed")
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        open_backend(toy_bundle, "tensorrt")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "openvino"}, "unknown backend 'openvino'"),
        ({"kind": "onnxruntime", "precision": "fp16"}, "precision 'fp16'"),
        ({"kind": "onnxruntime", "providers": ["MIGraphXExecutionProvider"]}, "not installed"),
    ],
)
def test_unavailable_choices_are_typed(toy_bundle: Bundle, kwargs: dict, message: str) -> None:
    with pytest.raises(BackendUnavailable, match=message):
        open_backend(toy_bundle, **kwargs)


def test_graph_that_does_not_match_the_manifest_is_refused(toy_bundle: Bundle, tmp_path: Path) -> None:
    backend = OnnxRuntimeBackend(toy_bundle)
    renamed = TensorSpec("pixels", "float32", (BATCH, 3))
    # the manifest now promises an input the graph does not have (an exporter/runtime drift)
    backend.bundle.manifest.parts["decoder"] = dataclasses.replace(
        _spec("decoder", tmp_path), inputs=(renamed, M, BIAS)
    )
    with pytest.raises(EngineError, match="do not match the manifest"):
        backend.load("decoder")


# ------------------------------------------------------------------ input validation


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(x=d["x"].astype(np.float64)), "input 'x' has dtype float64, expected float32"),
        (lambda d: d.update(m=d["m"].astype(np.int64)), "input 'm' has dtype int64, expected int32"),
        (lambda d: d.update(x=d["x"].reshape(2, 3, 1)), "input 'x' has shape \\[2, 3, 1\\], expected rank 2"),
        (lambda d: d.update(x=np.zeros((2, 4), np.float32)), "input 'x' has shape \\[2, 4\\]"),
        (lambda d: d.update(bias=np.zeros((2, 3), np.float32)), "input 'bias' has shape \\[2, 3\\]"),
        (lambda d: d.update(m=np.ones((3, 3), np.int32)), "input 'm' has batch 3, other inputs have batch 2"),
        (lambda d: d.pop("m"), "missing \\['m'\\]"),
        (lambda d: d.update(z=d["x"]), "unexpected \\['z'\\]"),
        (lambda d: d.update(x=d["x"].tolist()), "input 'x' is list"),
        (
            lambda d: d.update(x=np.zeros((0, 3), np.float32), m=np.zeros((0, 3), np.int32)),
            "batch must be at least 1",
        ),
    ],
)
def test_bad_inputs_name_the_tensor(toy_bundle: Bundle, mutate, message: str) -> None:
    part = OnnxRuntimeBackend(toy_bundle).load("text_encoder")
    inputs = _inputs(batch=2)
    mutate(inputs)
    with pytest.raises(EngineError, match=message):
        part.run(inputs)


def test_max_batch_is_enforced_when_given(toy_bundle: Bundle) -> None:
    spec = toy_bundle.part("decoder")
    assert validate_inputs(spec, _inputs(batch=4), max_batch=4) == 4
    with pytest.raises(EngineError, match="batch 5 exceeds this engine's max batch 4"):
        validate_inputs(spec, _inputs(batch=5), max_batch=4)
