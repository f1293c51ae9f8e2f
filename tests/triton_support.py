"""Shared by the Triton tests: the model repository of the tiny bundle and a real tritonserver.

The server is PyPI's nvidia-pytriton wheel's tritonserver (deploy/triton/local.py); where it
cannot be installed (no wheel for this platform, Python built without libpython.so) the tests
that need it skip and say why. Everything else about it is real: the repository is the one
``python -m export triton --platform python`` writes, clients speak gRPC to it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from deploy.triton.local import LocalTriton, TritonUnavailable, find_tritonserver

# Batch limit of the batched parts in the test repository: 8 concurrent clients can fill it.
TEST_MAX_BATCH = 8


def require_tritonserver() -> None:
    try:
        find_tritonserver()
    except TritonUnavailable as exc:
        pytest.skip(f"no tritonserver here: {exc}")


def write_test_repository(bundle: Path, out: Path) -> Path:
    from export.__main__ import main

    code = main(["triton", str(bundle), str(out), "--platform", "python", "--max-batch", str(TEST_MAX_BATCH),
                 "--request-instances", "1", "--queue-delay-us", "20000"])
    assert code == 0, "python -m export triton failed"
    return out


@pytest.fixture(scope="session")
def triton_repository(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_repository(tiny_bundle, tmp_path_factory.mktemp("triton") / "repository")


@pytest.fixture(scope="session")
def local_triton(triton_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    require_tritonserver()
    server = LocalTriton(triton_repository, log_path=tmp_path_factory.mktemp("triton-log") / "tritonserver.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()


def png_bytes(width: int = 160, height: int = 120, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
