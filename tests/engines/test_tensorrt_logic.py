"""The TensorRT builder's decisions, tested as pure functions (no GPU, no TensorRT, no mocks)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engines.bundle import BATCH, PartSpec, TensorSpec
from engines.errors import EngineError
from engines.tensorrt_build import (
    DEFAULT_WORKSPACE_MB,
    BuildSettings,
    LayerInfo,
    build_log_path,
    engine_key,
    fp32_pinned_layers,
    is_plan_current,
    key_for,
    plan_path,
    precision_summary,
    profile_shapes,
    stale_plans,
    tensorrt_installed,
    tolerance_report,
)

REPO = Path(__file__).resolve().parents[2]
# Not find_spec: tensorrt-stubs (requirements/dev.txt) installs a stub-only `tensorrt` directory.
HAS_TENSORRT = tensorrt_installed()

# The decoder's contract at the tiny config: image features with batch fixed to 1, prompts batched.
DECODER = PartSpec(
    name="decoder",
    file="decoder.onnx",
    sha256="ab" * 32,
    inputs=(
        TensorSpec("fpn_0", "float32", (1, 32, 32, 32)),
        TensorSpec("fpn_1", "float32", (1, 32, 16, 16)),
        TensorSpec("fpn_2", "float32", (1, 32, 8, 8)),
        TensorSpec("geometry_cls", "float32", (1, 1, 32)),
        TensorSpec("text_features", "float32", (BATCH, 32, 32)),
        TensorSpec("text_mask", "int32", (BATCH, 32)),
    ),
    outputs=(
        TensorSpec("pred_masks", "float32", (BATCH, 10, 32, 32)),
        TensorSpec("pred_boxes", "float32", (BATCH, 10, 4)),
        TensorSpec("pred_logits", "float32", (BATCH, 10)),
        TensorSpec("presence_logits", "float32", (BATCH, 1)),
    ),
    fp32_layers=("/decoder/layers.0/norm1/LayerNormalization", "/decoder/ref_point_head/Sigmoid"),
    max_batch=8,
)
KEY_ARGS = dict(
    onnx_sha256="ab" * 32,
    tensorrt_version="10.3.0",
    compute_capability="8.7",
    precision="fp16",
    profile=profile_shapes(DECODER, 8),
    fp32_layers=DECODER.fp32_layers,
)


# ------------------------------------------------------------------ profiles and settings


def test_profile_covers_only_batched_inputs() -> None:
    shapes = profile_shapes(DECODER, 8)
    assert set(shapes) == {"text_features", "text_mask"}  # fixed-shape image features need none
    assert shapes["text_features"] == ((1, 32, 32), (1, 32, 32), (8, 32, 32))
    assert shapes["text_mask"] == ((1, 32), (1, 32), (8, 32))
    with pytest.raises(EngineError, match="at least 1"):
        profile_shapes(DECODER, 0)


def test_max_batch_flag_overrides_manifest() -> None:
    assert BuildSettings().max_batch_for(DECODER) == 8
    assert BuildSettings(max_batch=2).max_batch_for(DECODER) == 2
    unbatched = dataclasses.replace(DECODER, inputs=DECODER.inputs[:4], max_batch=8)
    assert BuildSettings(max_batch=4).max_batch_for(unbatched) == 1


def test_fp16_builder_config_description() -> None:
    config = BuildSettings(precision="fp16", workspace_mb=512, max_batch=4).builder_config(DECODER)
    assert config["flags"] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
    assert config["memory_pool_limits"] == {"WORKSPACE": 512 * 2**20}
    assert config["profiling_verbosity"] == "DETAILED"
    assert config["optimization_profiles"] == [
        {
            "text_features": {"min": [1, 32, 32], "opt": [1, 32, 32], "max": [4, 32, 32]},
            "text_mask": {"min": [1, 32], "opt": [1, 32], "max": [4, 32]},
        }
    ]
    json.dumps(config)  # goes into the build log as is


def test_fp32_builder_config_has_no_precision_flags_and_default_workspace_fits_orin_nano() -> None:
    settings = BuildSettings(precision="fp32")
    assert settings.builder_config(DECODER)["flags"] == []
    assert settings.workspace_mb == DEFAULT_WORKSPACE_MB <= 1024  # 8 GB shared by CPU and GPU


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"precision": "int8"}, "precision must be one of"),
        ({"workspace_mb": 0}, "workspace must be at least"),
        ({"max_batch": 0}, "max batch must be at least 1"),
        ({"builder_optimization_level": 7}, "0..5"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(EngineError, match=message):
        BuildSettings(**kwargs)


# ------------------------------------------------------------------ engine key and plan names


@pytest.mark.parametrize(
    "change",
    [
        {"onnx_sha256": "cd" * 32},
        {"tensorrt_version": "10.7.0"},
        {"compute_capability": "8.6"},
        {"precision": "fp32"},
        {"profile": profile_shapes(DECODER, 4)},
        {"fp32_layers": ("/decoder/layers.0/norm1/LayerNormalization",)},
    ],
    ids=["onnx", "tensorrt", "gpu", "precision", "profile", "fp32_layers"],
)
def test_engine_key_changes_with_each_input(change: dict) -> None:
    base = engine_key(**KEY_ARGS)
    assert engine_key(**{**KEY_ARGS, **change}) != base


def test_engine_key_is_stable_and_short() -> None:
    key = engine_key(**KEY_ARGS)
    assert key == engine_key(**{**KEY_ARGS, "fp32_layers": tuple(reversed(DECODER.fp32_layers))})
    assert len(key) == 16 and int(key, 16) >= 0
    # fp32 builds pin nothing, so the pin list must not force a rebuild there
    fp32 = {**KEY_ARGS, "precision": "fp32"}
    assert engine_key(**fp32) == engine_key(**{**fp32, "fp32_layers": ()})


def test_key_for_reads_the_part_spec() -> None:
    settings = BuildSettings(max_batch=4)
    assert key_for(DECODER, settings, "10.3.0", "8.7") == engine_key(
        **{**KEY_ARGS, "profile": profile_shapes(DECODER, 4)}
    )
    other_onnx = dataclasses.replace(DECODER, sha256="ef" * 32)
    assert key_for(other_onnx, settings, "10.3.0", "8.7") != key_for(DECODER, settings, "10.3.0", "8.7")


def test_plan_naming(tmp_path: Path) -> None:
    key = engine_key(**KEY_ARGS)
    plan = plan_path(tmp_path / "engines", "decoder", key)
    assert plan == tmp_path / "engines" / f"decoder.{key}.plan"
    assert build_log_path(plan).name == f"decoder.{key}.build.json"
    with pytest.raises(EngineError, match="malformed engine key"):
        plan_path(tmp_path, "decoder", "../../etc")
    with pytest.raises(EngineError, match="unknown part"):
        plan_path(tmp_path, "vision", key)


# ------------------------------------------------------------------ stale / foreign plans


def _write_plan(directory: Path, key: str, payload: bytes = b"serialized-engine") -> Path:
    """What build_plan writes: the plan, then the JSON log that vouches for it."""
    plan = plan_path(directory, "decoder", key)
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(payload)
    log = {
        "key": key,
        "plan": plan.name,
        "plan_bytes": len(payload),
        "plan_sha256": hashlib.sha256(payload).hexdigest(),
    }
    build_log_path(plan).write_text(json.dumps(log))
    return plan


def test_current_plan_is_recognised(tmp_path: Path) -> None:
    key = engine_key(**KEY_ARGS)
    assert is_plan_current(_write_plan(tmp_path, key), key)


def test_missing_plan_or_log_is_not_current(tmp_path: Path) -> None:
    key = engine_key(**KEY_ARGS)
    plan = plan_path(tmp_path, "decoder", key)
    assert not is_plan_current(plan, key)
    plan.write_bytes(b"copied from somewhere, no build log")
    assert not is_plan_current(plan, key)


def test_plan_from_other_build_is_not_current(tmp_path: Path) -> None:
    key, other = engine_key(**KEY_ARGS), engine_key(**{**KEY_ARGS, "compute_capability": "8.6"})
    plan = _write_plan(tmp_path, key)
    # a foreign plan renamed to our key: its log says another key
    log = json.loads(build_log_path(plan).read_text())
    build_log_path(plan).write_text(json.dumps({**log, "key": other}))
    assert not is_plan_current(plan, key)


def test_truncated_or_replaced_plan_is_not_current(tmp_path: Path) -> None:
    key = engine_key(**KEY_ARGS)
    plan = _write_plan(tmp_path, key, b"serialized-engine")
    plan.write_bytes(b"serialized")  # torn write
    assert not is_plan_current(plan, key)
    plan.write_bytes(b"SERIALIZED-ENGINE")  # same size, other bytes
    assert not is_plan_current(plan, key)
    assert is_plan_current(plan, key, verify_hash=False)  # size-only check is the caller's choice
    build_log_path(plan).write_text("{not json")
    assert not is_plan_current(plan, key)


def test_stale_plans_are_the_other_keys_of_the_part(tmp_path: Path) -> None:
    current = engine_key(**KEY_ARGS)
    old = engine_key(**{**KEY_ARGS, "tensorrt_version": "10.0.1"})
    _write_plan(tmp_path, current)
    old_plan = _write_plan(tmp_path, old)
    (tmp_path / f"image_encoder.{old}.plan").write_bytes(b"another part")
    (tmp_path / "timing.cache").write_bytes(b"shared")
    assert stale_plans(tmp_path, "decoder", current) == sorted([old_plan, build_log_path(old_plan)])
    assert stale_plans(tmp_path / "absent", "decoder", current) == []


# ------------------------------------------------------------------ FP32 pinning


def test_norm_softmax_reduce_layers_and_manifest_names_are_pinned() -> None:
    layers = [
        LayerInfo("/encoder/ln/LayerNormalization", "NORMALIZATION"),
        LayerInfo("/encoder/attn/Softmax", "SOFTMAX"),
        LayerInfo("/encoder/ln2/ReduceMean", "REDUCE"),
        LayerInfo("/encoder/fc1/MatMul", "MATRIX_MULTIPLY"),
        # a layer the parser generated for a manifest node: matched through TensorRT 10's metadata
        LayerInfo(
            "ONNXTRT_Broadcast_12", "ELEMENTWISE", ("FLOAT",), "[ONNX Layer: /decoder/ref_point_head/Sigmoid]"
        ),
        LayerInfo("/decoder/layers.0/norm1/LayerNormalization", "NORMALIZATION"),
        # shape arithmetic: an int reduction must never get an FP32 output type
        LayerInfo("/encoder/shape/ReduceProd", "REDUCE", ("INT64",)),
    ]
    plan = fp32_pinned_layers(layers, DECODER.fp32_layers + ("/decoder/renamed/Pow",))
    assert plan.pinned == (
        "/encoder/ln/LayerNormalization",
        "/encoder/attn/Softmax",
        "/encoder/ln2/ReduceMean",
        "ONNXTRT_Broadcast_12",
        "/decoder/layers.0/norm1/LayerNormalization",
    )
    assert plan.by_type == 4
    assert plan.unmatched == ("/decoder/renamed/Pow",)  # logged, so a renamed node is noticed


def test_pinning_accepts_plain_tuples() -> None:
    plan = fp32_pinned_layers(
        [("a", "SOFTMAX"), ("b", "CONVOLUTION"), ("c", "CONVOLUTION", ("HALF",))], ["c"]
    )
    assert plan.pinned == ("a", "c") and plan.unmatched == ()


# ------------------------------------------------------------------ build log and check report


def test_precision_summary_from_engine_inspector_json() -> None:
    # Shape of IEngineInspector.get_engine_information(LayerInformationFormat.JSON) at DETAILED.
    information = {
        "Layers": [
            {
                "Name": "/ln/LayerNormalization",
                "LayerType": "Normalization",
                "Outputs": [{"Format/Datatype": "Float"}],
            },
            {"Name": "fc1 + gelu", "LayerType": "gemm", "Outputs": [{"Format/Datatype": "Half"}]},
            {
                "Name": "conv",
                "LayerType": "Convolution",
                "Outputs": [{"Format/Datatype": "Row major linear FP16 format"}],
            },
            {"Name": "shape", "LayerType": "Shape", "Outputs": [{"Format/Datatype": "Int32"}]},
            "legacy-name-only-entry",
        ],
        "Bindings": ["pixel_values", "fpn_0"],
    }
    summary = precision_summary(information)
    assert summary["by_precision"] == {"fp16": 2, "fp32": 1, "int32": 1, "unknown": 1}
    assert summary["layers"] == 5
    assert summary["fp32_layers"] == ["/ln/LayerNormalization"]


def test_tolerance_report() -> None:
    ref = {"a": np.array([1.0, -20.0, 0.0]), "b": np.zeros(2)}
    close = {"a": np.array([1.01, -20.5, 0.02]), "b": np.zeros(2)}
    report = tolerance_report(ref, close, atol=0.05, rtol=0.05)
    assert report["passed"] and report["tensors"]["a"]["max_abs"] == pytest.approx(0.5)
    far = tolerance_report(ref, {"a": np.array([1.5, -20.0, 0.0]), "b": np.zeros(2)}, atol=0.05, rtol=0.05)
    assert not far["passed"] and far["tensors"]["a"]["violations"] == 1
    nan = tolerance_report(ref, {"a": np.array([np.nan, -20.0, 0.0]), "b": np.zeros(3)}, atol=1, rtol=1)
    assert not nan["tensors"]["a"]["passed"] and "shape" in nan["tensors"]["b"]["error"]
    assert not tolerance_report(ref, {"a": ref["a"]}, atol=1, rtol=1)["passed"]  # "b" missing


# ------------------------------------------------------------------ the CLI off-device


@pytest.mark.parametrize("command", ["build", "check"])
def test_device_commands_exit_2_without_tensorrt(tiny_bundle: Path, command: str) -> None:
    if HAS_TENSORRT:
        pytest.skip("tensorrt is installed here")
    proc = subprocess.run(
        [sys.executable, "-m", "engines", command, str(tiny_bundle)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "TensorRT is not installed" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tiny_bundle / "engines").exists() or not list((tiny_bundle / "engines").glob("*.plan"))


def test_numpy_dtypes_of_tensorrt_types() -> None:
    from engines.tensorrt import numpy_dtype

    # What trt.nptype answers for the types the bundles' graphs use.
    assert numpy_dtype("FLOAT") == np.float32 and numpy_dtype("HALF") == np.float16
    assert numpy_dtype("INT32") == np.int32 and numpy_dtype("INT64") == np.int64
    assert numpy_dtype("BOOL") == np.bool_ and numpy_dtype("INT8") == np.int8
    with pytest.raises(EngineError, match="FP8"):
        numpy_dtype("FP8")
