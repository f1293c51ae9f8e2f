"""Fail fast: a bundle that cannot be loaded stops ``python -m server`` (and the container
entrypoint) with exit code 2 and ONE line naming the file and the reason; the traceback only
with ``--log-level debug``. Every way a bundle can be broken is a case here."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from tests.server.conftest import REPO, free_port


def _rehash(bundle: Path, rel: str) -> None:
    """Make the manifest agree with a damaged file: the sha256 check cannot catch it."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    digest = hashlib.sha256((bundle / rel).read_bytes()).hexdigest()
    for part in manifest["parts"].values():
        if part["file"] == rel:
            part["sha256"] = digest
    if manifest["tokenizer"]["file"] == rel:
        manifest["tokenizer"]["sha256"] = digest
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _edit_manifest(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(bundle: Path) -> None:
        manifest = json.loads((bundle / "manifest.json").read_text())
        edit(manifest)
        (bundle / "manifest.json").write_text(json.dumps(manifest))

    return apply


def _truncate(rel: str, rehash: bool) -> Callable[[Path], None]:
    def apply(bundle: Path) -> None:
        data = (bundle / rel).read_bytes()
        (bundle / rel).write_bytes(data[: len(data) // 2])
        if rehash:
            _rehash(bundle, rel)

    return apply


def _zero_middle(bundle: Path) -> None:
    data = bytearray((bundle / "decoder.onnx").read_bytes())
    data[len(data) // 3 : len(data) // 3 + 8192] = bytes(8192)
    (bundle / "decoder.onnx").write_bytes(bytes(data))
    _rehash(bundle, "decoder.onnx")


def _bad_tokenizer(bundle: Path) -> None:
    (bundle / "tokenizer.json").write_text("{}")
    _rehash(bundle, "tokenizer.json")


CASES: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "truncated-onnx": (_truncate("decoder.onnx", rehash=False), ["decoder.onnx", "corrupt"]),
    "truncated-onnx-hash-matching": (_truncate("image_encoder.onnx", rehash=True), ["image_encoder.onnx"]),
    "corrupt-onnx-hash-matching": (_zero_middle, ["decoder.onnx"]),
    "manifest-not-json": (lambda b: (b / "manifest.json").write_text("{not json"), ["manifest.json"]),
    "manifest-mistyped": (_edit_manifest(lambda m: m["model"].update(image_size="112px")),
                          ["manifest.json", "image_size", "int"]),
    "manifest-mistyped-part": (_edit_manifest(lambda m: m["parts"].update(decoder=["x"])), ["manifest.json"]),
    "manifest-wrong-shape": (_edit_manifest(lambda m: m["model"].update(mask_size=[32])), ["manifest.json", "mask_size"]),
    "tokenizer-missing": (lambda b: (b / "tokenizer.json").unlink(), ["tokenizer.json", "missing"]),
    "tokenizer-hash-matching-garbage": (_bad_tokenizer, ["tokenizer.json"]),
}


def _broken(server_bundle: Path, tmp_path: Path, case: str) -> Path:
    bundle = tmp_path / case
    shutil.copytree(server_bundle, bundle, ignore=shutil.ignore_patterns("engines"))
    CASES[case][0](bundle)
    return bundle


def _server(bundle: Path, *args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAM3_")}
    env.update(SAM3_ID_SECRET_FILE=str(tmp_path / "id-secret"), SAM3_LOG_LEVEL="warning")
    return subprocess.run(
        [sys.executable, "-m", "server", "--bundle", str(bundle), "--port", str(free_port()), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_server_exits_with_one_line_naming_the_file(server_bundle: Path, tmp_path: Path, case: str) -> None:
    result = _server(_broken(server_bundle, tmp_path, case), tmp_path=tmp_path)
    output = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 2, output
    assert len(output) == 1, output
    assert output[0].startswith("python -m server: cannot load bundle")
    for word in CASES[case][1]:
        assert word in output[0], output


def test_traceback_only_at_debug_and_check_mode(server_bundle: Path, tmp_path: Path) -> None:
    bundle = _broken(server_bundle, tmp_path, "corrupt-onnx-hash-matching")
    debug = _server(bundle, "--log-level", "debug", tmp_path=tmp_path)
    assert debug.returncode == 2 and "Traceback" in debug.stdout + debug.stderr
    check = _server(bundle, "--check", tmp_path=tmp_path)
    lines = [line for line in (check.stdout + check.stderr).splitlines() if line.strip()]
    assert check.returncode == 2 and len(lines) == 1 and "decoder.onnx" in lines[0]
    good = _server(server_bundle, "--check", tmp_path=tmp_path)
    assert good.returncode == 0 and "loads" in good.stdout


def test_entrypoint_loads_the_graphs_before_serving(server_bundle: Path, tmp_path: Path) -> None:
    """The container's entrypoint checks sha256s, then loads the graphs: a hash-matching corrupt
    file exits with code 2 and never reaches the server."""
    bundle = _broken(server_bundle, tmp_path, "corrupt-onnx-hash-matching")
    marker = tmp_path / "served"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAM3_")}
    env.update(
        SAM3_BUNDLE=str(bundle), SAM3_ENGINES_DIR=str(tmp_path / "engines"), SAM3_BACKEND="onnxruntime",
        SAM3_PORT=str(free_port()), SAM3_HOST="127.0.0.1", SAM3_ID_SECRET_FILE=str(tmp_path / "id-secret"),
        SAM3_CHECK_CMD=shlex.join([sys.executable, "-m", "server", "--check"]),
        SAM3_SERVE_CMD=shlex.join(["touch", str(marker)]), PYTHONPATH=str(REPO),
    )  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "deploy.entrypoint"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr
    assert f"the bundle at {bundle} does not load" in result.stderr and "decoder.onnx" in result.stderr
    assert not marker.exists(), "the server must not start on a bundle that does not load"
