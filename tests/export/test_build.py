"""`python -m export build|inspect` on the tiny model: what a user sees, and what the bundle holds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

from engines.bundle import BATCH, Bundle, TensorNames as T
from engines.errors import BundleError
from export.__main__ import main
from export.build import BuildOptions, build_bundle
from export.verify import ParityBounds, VerificationError


def test_bundle_validates_and_reports_parity_within_bounds(tiny_bundle: Path) -> None:
    bundle = Bundle(tiny_bundle)
    manifest = bundle.manifest
    summary = manifest.parity["summary"]
    assert summary["cases"] >= 5  # three real photos + two synthetic images
    assert summary["logits_max_abs"] <= 1e-3
    assert summary["presence_max_abs"] <= 1e-3
    assert summary["mask_iou_min"] >= 0.99
    assert summary["same_top_query"] is True
    assert manifest.op_audit["all_supported"], manifest.op_audit
    assert manifest.source.format == "hf"


def test_manifest_records_the_tensor_contract(tiny_bundle: Path) -> None:
    manifest = Bundle(tiny_bundle).manifest
    image, text, decoder = (manifest.part(p) for p in ("image_encoder", "text_encoder", "decoder"))
    grid = manifest.model.image_size // manifest.model.patch_size
    hidden = manifest.model.hidden_size
    assert image.input(T.PIXEL_VALUES).shape == (BATCH, 3, manifest.model.image_size, manifest.model.image_size)
    assert [image.output(n).shape for n in T.FPN] == [
        (BATCH, hidden, 4 * grid, 4 * grid), (BATCH, hidden, 2 * grid, 2 * grid), (BATCH, hidden, grid, grid)]
    assert image.output(T.GEOMETRY_CLS).shape == (BATCH, 1, hidden)
    # TensorRT-friendly integer inputs: int32, not int64
    assert text.input(T.INPUT_IDS).dtype == "int32" and text.input(T.ATTENTION_MASK).dtype == "int32"
    # the decoder takes one image and a batch of prompts
    assert decoder.input(T.FPN[0]).shape[0] == 1 and decoder.input(T.TEXT_FEATURES).shape[0] == BATCH
    assert decoder.output(T.PRED_LOGITS).shape == (BATCH, manifest.model.num_queries)
    assert decoder.max_batch == 8
    assert manifest.tokenizer.context_length == 32


def test_graphs_have_no_roialign_and_only_batch_is_dynamic(tiny_bundle: Path) -> None:
    for name in ("image_encoder", "text_encoder", "decoder"):
        graph = onnx.load(str(tiny_bundle / f"{name}.onnx")).graph
        assert "RoiAlign" not in {node.op_type for node in graph.node}
        for value in list(graph.input) + list(graph.output):
            params = {d.dim_param for d in value.type.tensor_type.shape.dim if d.dim_param}
            assert params <= {BATCH}, (name, value.name, params)


def test_fp16_report_present(tiny_bundle: Path) -> None:
    report = Bundle(tiny_bundle).manifest.fp16_range
    for part in ("image_encoder", "text_encoder", "decoder"):
        entry = report["parts"][part]
        assert entry["max_abs_by_op"]["LayerNorm"] > 0
        errors = entry["fp16_output_error"]
        assert isinstance(errors, dict) and all(e["non_finite"] == 0 for e in errors.values())


def test_inspect_prints_summary_and_rechecks_hashes(tiny_bundle: Path, capsys) -> None:
    assert main(["inspect", str(tiny_bundle)]) == 0
    out = capsys.readouterr().out
    assert "sam3-tiny" in out and "sha256 ok" in out and "mask IoU" in out


def test_inspect_detects_a_corrupt_file(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "corrupt"
    shutil.copytree(tiny_bundle, copy)
    data = bytearray((copy / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "decoder.onnx").write_bytes(bytes(data))
    assert main(["inspect", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "decoder.onnx is corrupt" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(BundleError):
        Bundle(copy)


def test_manifest_schema_version_is_checked(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "future"
    shutil.copytree(tiny_bundle, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["schema_version"] = 999
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="schema_version"):
        Bundle(copy)


def test_failed_verification_leaves_the_old_bundle_untouched(tiny_model, tiny_bundle: Path, tmp_path: Path) -> None:
    target = tmp_path / "existing"
    shutil.copytree(tiny_bundle, target)
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    impossible = ParityBounds(logits_max_abs=-1.0)
    options = BuildOptions(name="never", source=Bundle(tiny_bundle).manifest.source, bounds=impossible,
                           fp16_check=False)
    with pytest.raises(VerificationError):
        build_bundle(tiny_model, target, options)
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]  # no staging dir left


@pytest.mark.parametrize("make_bad", ["missing", "text_as_pt", "truncated_safetensors", "missing_layer"])
def test_bad_checkpoints_fail_with_one_line_and_write_nothing(make_bad, tiny_hf_checkpoint: Path,
                                                              tmp_path: Path, capsys) -> None:
    checkpoint = _bad_checkpoint(make_bad, tiny_hf_checkpoint, tmp_path)
    out = tmp_path / "out" / "bundle"
    code = main(["build", "--checkpoint", str(checkpoint), "--out", str(out), "--skip-fp16-check"])
    assert code != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))


def test_inconsistent_image_size_is_refused(tiny_hf_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bundle"
    code = main(["build", "--checkpoint", str(tiny_hf_checkpoint), "--out", str(out), "--image-size", "100"])
    assert code != 0
    err = capsys.readouterr().err
    assert "100" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def _bad_checkpoint(kind: str, good: Path, tmp_path: Path) -> Path:
    if kind == "missing":
        return tmp_path / "does-not-exist.pt"
    if kind == "text_as_pt":
        path = tmp_path / "notes.pt"
        path.write_text("these are not weights\n")
        return path
    bad = tmp_path / kind
    shutil.copytree(good, bad)
    weights = bad / "model.safetensors"
    if kind == "truncated_safetensors":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return bad
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    dropped = [k for k in state if "detr_decoder.layers.0" in k]
    for key in dropped:
        del state[key]
    save_file(state, str(weights), metadata={"format": "pt"})
    return bad


def test_demo_command_exports_the_seeded_random_model(tmp_path: Path, capsys) -> None:
    """`python -m export demo` (what `make demo` runs), at the tiny preset to stay fast."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--preset", "tiny", "--skip-fp16-check", "--verify-cases", "1"]) == 0
    captured = capsys.readouterr().out
    assert "RANDOM weights" in captured
    manifest = Bundle(out).manifest
    assert manifest.name == "sam3-tiny-random-weights" and manifest.source.format == "hf"
    again = tmp_path / "again"
    assert main(["demo", "--out", str(again), "--preset", "tiny", "--skip-fp16-check", "--verify-cases", "1"]) == 0
    # seeded: the same weights every time, whatever the files' bytes
    assert {p.name: p.weights_sha256 for p in Bundle(again).manifest.parts.values()} == {
        p.name: p.weights_sha256 for p in manifest.parts.values()}


def test_decoder_batch_defaults_follow_mask_resolution() -> None:
    from export.build import default_decoder_max_batch
    from export.presets import preset_config

    assert default_decoder_max_batch(preset_config("tiny")) == 8
    assert default_decoder_max_batch(preset_config("sam3_small")) == 8
    assert default_decoder_max_batch(preset_config("full")) == 2
