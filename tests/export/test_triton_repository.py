"""``python -m export triton``: the model repository, its configs against Triton's protobuf schema.

No server here (tests/engines/test_triton_live.py runs one). The schema is Triton's own
``ModelConfig`` message (tritonclient's model_config_pb2): every config.pbtxt is parsed into it,
for all three platforms, including ``tensorrt_plan`` and ``onnxruntime_onnx`` that cannot run on
this machine.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from engines.bundle import PART_NAMES, Bundle, sha256_file
from engines.errors import BundleError
from engines.triton import config_dims, expected_config_problems, triton_batching
from export.__main__ import main
from export.triton import MARKER, RepositoryOptions, to_pbtxt, validate_pbtxt, write_repository

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="tritonclient (requirements/runtime.txt) holds Triton's model-config schema")
from google.protobuf import json_format  # noqa: E402 - after the importorskip above


def parse(path: Path):
    config = validate_pbtxt(path.read_text(), required=True)
    assert isinstance(config, model_config_pb2.ModelConfig)
    return config


def as_json(config) -> dict:
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def fake_plans(bundle: Path, engines_dir: Path, precision: str = "fp16", max_batch: int = 4) -> None:
    """Plans + build logs as `python -m engines build` writes them (the plan bytes are not a
    real engine: only the repository writer reads them here)."""
    from engines.tensorrt_build import build_log_path, plan_path

    engines_dir.mkdir(parents=True, exist_ok=True)
    manifest = Bundle(bundle).manifest
    for i, part in enumerate(PART_NAMES):
        key = f"{i:016x}"
        plan = plan_path(engines_dir, part, key)
        plan.write_bytes(f"plan of {part}".encode())
        build_log_path(plan).write_text(json.dumps({
            "part": part, "key": key, "plan": plan.name, "plan_bytes": plan.stat().st_size,
            "plan_sha256": sha256_file(plan), "device": "Orin (sm_87)",
            "key_inputs": {"onnx_sha256": manifest.part(part).sha256, "tensorrt": "10.3.0", "precision": precision},
            "settings": {"precision": precision, "max_batch": max_batch},
        }))


@pytest.mark.parametrize("platform", ["python", "onnxruntime"])
def test_repository_configs_follow_the_manifest(tiny_bundle, tmp_path, platform):
    out = tmp_path / "repo"
    assert main(["triton", str(tiny_bundle), str(out), "--platform", platform]) == 0
    manifest = Bundle(tiny_bundle).manifest
    marker = json.loads((out / MARKER).read_text())
    assert marker["models"] == ["sam3_image_encoder", "sam3_text_encoder", "sam3_decoder", "sam3"]
    for part in PART_NAMES:
        spec = manifest.part(part)
        config = parse(out / f"sam3_{part}" / "config.pbtxt")
        if platform == "python":
            assert config.backend == "python" and (out / f"sam3_{part}" / "1" / "model.py").is_file()
            assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        else:
            assert config.platform == "onnxruntime_onnx"
            assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        # The graph is the bundle's, byte for byte.
        assert sha256_file(out / f"sam3_{part}" / "1" / "model.onnx") == spec.sha256
        assert config.parameters["sam3_part_sha256"].string_value == spec.sha256
        # Names, dtypes and dims are the manifest's; the client-side check agrees.
        assert [t.name for t in config.input] == list(spec.input_names)
        assert [t.name for t in config.output] == list(spec.output_names)
        assert expected_config_problems(spec, as_json(config)) == []
        if part == "decoder":  # one image broadcast over the prompts: not batchable across requests
            assert not triton_batching(spec) and config.max_batch_size == 0
            assert not config.HasField("dynamic_batching")
            assert list(config.input[0].dims) == [1, *spec.inputs[0].shape[1:]]
            assert list(config.output[0].dims)[0] == -1
        else:
            assert config.max_batch_size == max(1, spec.max_batch)
            assert list(config.input[0].dims) == config_dims(spec, True)[spec.inputs[0].name]
            assert config.HasField("dynamic_batching") == (config.max_batch_size > 1)
    request = parse(out / "sam3" / "config.pbtxt")
    assert request.backend == "python" and [t.name for t in request.input] == ["image", "request"]
    assert request.input[0].optional and request.output[0].data_type == model_config_pb2.TYPE_UINT8
    assert (out / "sam3" / "1" / "engines" / "pipeline.py").is_file()
    assert sha256_file(out / "sam3" / "1" / "bundle" / "tokenizer.json") == manifest.tokenizer.sha256


def test_tensorrt_repository_uses_the_built_plans(tiny_bundle, tmp_path):
    engines_dir = tmp_path / "engines"
    fake_plans(tiny_bundle, engines_dir, max_batch=4)
    out = tmp_path / "repo"
    assert main(["triton", str(tiny_bundle), str(out), "--engines-dir", str(engines_dir)]) == 0
    for part in PART_NAMES:
        config = parse(out / f"sam3_{part}" / "config.pbtxt")
        assert config.platform == "tensorrt_plan"
        assert (out / f"sam3_{part}" / "1" / "model.plan").read_bytes() == f"plan of {part}".encode()
        assert config.parameters["sam3_precision"].string_value == "fp16"
        assert config.parameters["sam3_tensorrt"].string_value == "10.3.0"
        # Triton may not batch past the plan's optimisation profile.
        assert config.max_batch_size == (0 if part == "decoder" else 4)
        assert config.parameters["sam3_max_batch"].string_value == "4"


def test_tensorrt_without_plans_is_one_line_and_writes_nothing(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["triton", str(tiny_bundle), str(out), "--engines-dir", str(tmp_path / "none")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "python -m engines build" in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".repo")]


def test_an_fp32_request_does_not_take_fp16_plans(tiny_bundle, tmp_path):
    fake_plans(tiny_bundle, tmp_path / "engines", precision="fp16")
    with pytest.raises(BundleError, match="no current fp32 TensorRT plan"):
        write_repository(tiny_bundle, tmp_path / "repo",
                         RepositoryOptions(platform="tensorrt", precision="fp32", engines_dir=tmp_path / "engines"))


def test_rewrite_is_atomic_and_never_replaces_a_foreign_directory(tiny_bundle, tmp_path):
    out = tmp_path / "repo"
    write_repository(tiny_bundle, out, RepositoryOptions(platform="onnxruntime"))
    write_repository(tiny_bundle, out, RepositoryOptions(platform="python"))  # ours: replaced
    assert parse(out / "sam3_decoder" / "config.pbtxt").backend == "python"
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"x")
    with pytest.raises(BundleError, match="not a repository this command wrote"):
        write_repository(tiny_bundle, foreign, RepositoryOptions(platform="python"))
    assert (foreign / "cat.jpg").read_bytes() == b"x"


def test_schema_check_rejects_what_triton_rejects():
    """The validator really validates: a misspelt field or an unknown enum fails to parse."""
    good = {"name": "m", "platform": "onnxruntime_onnx", "max_batch_size": 0}
    assert validate_pbtxt(to_pbtxt(good), required=True).name == "m"
    for broken in ('name: "m"\nmax_batch: 4\n', 'name: "m"\ninput [ { name: "x" data_type: TYPE_FLOAT32 dims: [ 1 ] } ]\n'):
        with pytest.raises(BundleError, match="model-config schema"):
            validate_pbtxt(broken, required=True)


def test_client_check_names_a_drifted_config(tiny_bundle):
    spec = Bundle(tiny_bundle).manifest.part("text_encoder")
    config = {"max_batch_size": 8, "input": [{"name": "input_ids", "data_type": "TYPE_INT64", "dims": [32]}],
              "output": [{"name": "text_features", "data_type": "TYPE_FP32", "dims": [7]}]}
    problems = expected_config_problems(spec, config)
    assert any("input_ids" in p and "TYPE_INT64" in p for p in problems)
    assert any("attention_mask" in p for p in problems)
    assert any("text_features" in p and "dims" in p for p in problems)


@pytest.mark.parametrize("argv", [
    ["--platform", "tensorflow"],
    ["--platform", "onnxruntime", "--prefix", "bad name"],
    ["--platform", "python", "--instances", "0"],
    ["--platform", "tensorrt", "--max-batch", "4"],
])
def test_bad_options_are_refused(tiny_bundle, tmp_path, argv, capsys):
    with pytest.raises(SystemExit) if argv[1] == "tensorflow" else contextlib.nullcontext():
        code = main(["triton", str(tiny_bundle), str(tmp_path / "repo"), *argv])
        assert code != 0
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "repo").exists()
