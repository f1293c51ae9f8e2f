"""``python -m clients`` as a user runs it: a subprocess against the real server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.server.conftest import REPO, image_bytes


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clients", *args], cwd=REPO, capture_output=True, text=True,
                          check=False, timeout=120)


def test_segment_writes_overlay_and_json(live_server, tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    image.write_bytes(image_bytes(120, 90, fmt="PNG", seed=201))
    out, doc = tmp_path / "overlay.png", tmp_path / "out.json"
    done = run_cli("segment", live_server.url, str(image), "a cat", "a dog", "--score-threshold", "0",
                   "--max-detections", "2", "--mask-format", "rle", "--out", str(out), "--json", str(doc))
    assert done.returncode == 0, done.stderr
    assert "'a cat': 2 detection(s)" in done.stdout
    body = json.loads(doc.read_text())
    assert [r["prompt"] for r in body["results"]] == ["a cat", "a dog"]
    assert body["image_size"] == {"width": 120, "height": 90}
    drawn = np.asarray(Image.open(out).convert("RGB"))
    original = np.asarray(Image.open(image).convert("RGB"))
    assert drawn.shape == original.shape
    assert (drawn != original).any(axis=-1).mean() > 0.01  # masks/boxes/labels were drawn


def test_embed_prints_image_id(live_server, tmp_path: Path) -> None:
    image = tmp_path / "photo.jpg"
    image.write_bytes(image_bytes(64, 48, seed=202))
    done = run_cli("embed", live_server.url, str(image))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] and len(done.stdout.split()[0]) == 64 and "64x48" in done.stdout


def test_server_error_is_one_line_and_nonzero(live_server, tmp_path: Path) -> None:
    image = tmp_path / "photo.jpg"
    image.write_bytes(image_bytes(64, 48, seed=203))
    done = run_cli("segment", live_server.url, str(image), *[f"p{i}" for i in range(9)])
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: HTTP 422 too_many_prompts")


def test_connection_refused_exit_code(tmp_path: Path) -> None:
    image = tmp_path / "photo.jpg"
    image.write_bytes(image_bytes(16, 16))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = run_cli("segment", f"http://127.0.0.1:{port}", str(image), "a cat")
    assert done.returncode == 3
    assert done.stderr.count("\n") == 1 and "connection refused" in done.stderr


def test_missing_image_and_bad_out_are_usage_errors(tmp_path: Path) -> None:
    done = run_cli("segment", "http://127.0.0.1:9", str(tmp_path / "nope.jpg"), "a cat")
    assert done.returncode == 2 and done.stderr.startswith("error: cannot read image")
    image = tmp_path / "photo.jpg"
    image.write_bytes(image_bytes(16, 16))
    done = run_cli("segment", "http://127.0.0.1:9", str(image), "a cat", "--out", str(tmp_path / "x.jpg"))
    assert done.returncode == 2 and "--out must name a .png" in done.stderr


def test_segment_with_boxes_sends_one_exemplar_prompt(live_server, tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    image.write_bytes(image_bytes(120, 90, fmt="PNG", seed=204))
    doc = tmp_path / "out.json"
    done = run_cli("segment", live_server.url, str(image), "a cat", "--box", "10,10,60,50",
                   "--negative-box", "70,20,110,80", "--score-threshold", "0", "--max-detections", "2",
                   "--json", str(doc))
    assert done.returncode == 0, done.stderr
    body = json.loads(doc.read_text())
    assert [r["prompt"] for r in body["results"]] == ["a cat"] and len(body["results"][0]["detections"]) == 2
    assert body["timings_ms"]["geometry_encoder"] > 0  # the boxes went through the prompt encoder
    done = run_cli("segment", live_server.url, str(image), "--box", "10,10,60,50", "--score-threshold", "0")
    assert done.returncode == 0 and "'visual':" in done.stdout, done.stderr


def test_bad_boxes_are_one_line_errors(live_server, tmp_path: Path) -> None:
    image = tmp_path / "photo.jpg"
    image.write_bytes(image_bytes(64, 48, seed=205))
    done = run_cli("segment", live_server.url, str(image), "--box", "10,10,100,40")
    assert done.returncode == 1 and done.stderr.startswith("error: HTTP 422 invalid_box"), done.stderr
    assert "outside the 64x48 image" in done.stderr and done.stderr.count("\n") == 1
    done = run_cli("segment", live_server.url, str(image), "a", "b", "--box", "1,1,9,9")
    assert done.returncode == 2 and "at most one text prompt" in done.stderr
    done = run_cli("segment", live_server.url, str(image), "--box", "1,1,9")
    assert done.returncode == 2 and "a box is x0,y0,x1,y1" in done.stderr
