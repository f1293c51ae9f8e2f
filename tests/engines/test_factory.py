"""Backend resolution: one decision (engines.factory.resolve_backend) for the CLI, the server
and the container entrypoint.

The regression this pins: an int8 ``cpu_only`` bundle with backend ``auto`` on a machine with
TensorRT. ``python -m engines segment`` ran it on ONNX Runtime, but the server resolved ``auto``
on its own, picked TensorRT and refused to start, and the entrypoint tried to build engines for
it. "A machine with TensorRT" is simulated for whole processes by a ``sitecustomize`` that makes
the TensorRT probes answer yes (no GPU here), so each entry point is run as a user runs it.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Imported at start-up by every Python process whose PYTHONPATH starts with its directory.
TENSORRT_PRESENT = textwrap.dedent(
    """
    # This machine "has TensorRT and a GPU", as far as backend selection can tell.
    # Each probe is patched in the module that owns it, where its callers look it up.
    import engines.tensorrt as _trt
    import engines.tensorrt_build as _trt_build
    _trt.tensorrt_available = lambda: True
    _trt_build.tensorrt_installed = lambda: True
    """
)


def _manifest(cpu_only: bool):
    from engines.bundle import Manifest, ModelInfo, Preprocessing, SourceInfo, TokenizerInfo

    return Manifest(
        name="m",
        model=ModelInfo("sam3", 28, 14, 8, 4, (8, 8)),
        preprocessing=Preprocessing(image_size=28),
        tokenizer=TokenizerInfo("tokenizer.json", "0" * 64, 32, 0, 1, 2),
        parts={},
        source=SourceInfo("none", "0" * 64, "demo"),
        export={"quantization": {"cpu_only": True}} if cpu_only else {},
    )


# ------------------------------------------------------------------ the decision


@pytest.mark.parametrize(
    "requested, cpu_only, tensorrt, precision, kind, chosen_precision",
    [
        ("auto", False, True, None, "tensorrt", "fp16"),
        ("auto", False, True, "fp32", "tensorrt", "fp32"),
        ("auto", False, False, None, "onnxruntime", "fp32"),
        ("auto", False, False, "fp16", "onnxruntime", "fp32"),  # a TensorRT precision does not bind the fallback
        ("auto", True, True, None, "onnxruntime", "fp32"),  # the int8 CPU bundle: never TensorRT
        ("auto", True, True, "fp16", "onnxruntime", "fp32"),
        ("onnxruntime", True, True, None, "onnxruntime", "fp32"),
        ("tensorrt", False, False, None, "tensorrt", "fp16"),  # explicit: opening it says if it is absent
    ],
)
def test_resolve_backend(requested, cpu_only, tensorrt, precision, kind, chosen_precision) -> None:
    from engines.factory import resolve_backend

    choice = resolve_backend(_manifest(cpu_only), requested, precision=precision, present={"tensorrt": tensorrt})
    assert (choice.kind, choice.precision) == (kind, chosen_precision)
    assert choice.reason


@pytest.mark.parametrize(
    "requested, cpu_only, precision, message",
    [
        ("tensorrt", True, None, "cpu_only"),
        ("onnxruntime", False, "fp16", "precision 'fp16'"),
        ("tensorrt", False, "int8", "precision 'int8'"),
        ("openvino", False, None, "unknown backend 'openvino'"),
    ],
)
def test_resolve_backend_refuses(requested, cpu_only, precision, message) -> None:
    from engines.errors import BackendUnavailable
    from engines.factory import resolve_backend

    with pytest.raises(BackendUnavailable, match=message):
        resolve_backend(_manifest(cpu_only), requested, precision=precision, present={"tensorrt": True})


def test_every_kind_is_one_registry_entry() -> None:
    from engines.factory import AUTO_ORDER, BACKEND_KINDS, KINDS

    assert BACKEND_KINDS == ("auto", *KINDS)
    assert set(AUTO_ORDER) <= set(KINDS) and KINDS[AUTO_ORDER[-1]].runs_cpu_only


# ------------------------------------------------------------------ every entry point, as run


@pytest.fixture(scope="module")
def cpu_only_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle marked cpu_only as `python -m export quantize` marks its int8 copy (the
    graphs stay fp32: what is tested is who runs it, not int8 arithmetic)."""
    out = tmp_path_factory.mktemp("cpu-only") / "bundle"
    out.mkdir()
    for item in tiny_bundle.iterdir():
        if item.is_file() and item.name != "manifest.json":
            (out / item.name).symlink_to(item)
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    manifest["export"]["quantization"] = {"method": "test", "parts": [], "cpu_only": True}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def tensorrt_machine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    hook = tmp_path_factory.mktemp("tensorrt-present")
    (hook / "sitecustomize.py").write_text(TENSORRT_PRESENT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAM3_")}
    env.update(PYTHONPATH=os.pathsep.join([str(hook), str(REPO)]), SAM3_LOG_LEVEL="warning")
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                if resp.status == 200:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/info", timeout=5) as info:
                        return json.loads(info.read())
        except urllib.error.HTTPError as exc:
            last = json.loads(exc.read() or b"{}")
            if last.get("state") == "failed":
                break
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"not ready (last {last}, exit {proc.poll()}):\n{log.read_text()[-3000:]}")


def _serve(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as handle:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_cli_auto_runs_a_cpu_only_bundle_on_onnxruntime(cpu_only_bundle, tensorrt_machine, tmp_path) -> None:
    import cv2
    import numpy as np

    image = tmp_path / "image.png"
    cv2.imwrite(str(image), np.full((48, 64, 3), 127, np.uint8))
    proc = subprocess.run(
        [sys.executable, "-m", "engines", "segment", str(cpu_only_bundle), str(image), "a cat", "--backend", "auto"],
        cwd=REPO, env=tensorrt_machine, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "backend onnxruntime" in proc.stdout


def test_server_auto_serves_a_cpu_only_bundle_on_onnxruntime(cpu_only_bundle, tensorrt_machine, tmp_path) -> None:
    port = _free_port()
    log = tmp_path / "server.log"
    env = dict(tensorrt_machine, SAM3_BACKEND="auto")
    proc = _serve([sys.executable, "-m", "server", "--bundle", str(cpu_only_bundle), "--port", str(port)], env, log)
    try:
        info = _wait_ready(port, proc, log)
        assert info["model"]["backend"] == "onnxruntime"
    finally:
        _stop(proc)


def test_entrypoint_auto_builds_nothing_for_a_cpu_only_bundle(cpu_only_bundle, tensorrt_machine, tmp_path) -> None:
    """The container: no TensorRT build for it (a build would fail the start), the real server
    takes over and serves it on ONNX Runtime."""
    port = _free_port()
    log = tmp_path / "entrypoint.log"
    failing_builder = shlex.join([sys.executable, "-c", "import sys; print('BUILDER RAN'); sys.exit(3)"])
    env = dict(
        tensorrt_machine,
        SAM3_BUNDLE=str(cpu_only_bundle),
        SAM3_ENGINES_DIR=str(tmp_path / "engines"),
        SAM3_HOST="127.0.0.1",
        SAM3_PORT=str(port),
        SAM3_BACKEND="auto",
        SAM3_ENGINE_BUILD_CMD=failing_builder,
    )
    proc = _serve([sys.executable, "-m", "deploy.entrypoint"], env, log)
    try:
        info = _wait_ready(port, proc, log)
        assert info["model"]["backend"] == "onnxruntime"
        assert "BUILDER RAN" not in log.read_text()
    finally:
        _stop(proc)
