"""``python -m benchmarks.hostile --bundle DIR``: the server under hostile traffic, measured.

Three measurements against real ``python -m server`` processes (peak RSS from /proc):

1. **40 MP request**: one multipart request, a 40 MP JPEG with 16 prompts at score 0 (every
   query kept): what it adds at its peak, and mask-encoding time per mask at 2 and 16 prompts.
2. **64-burst**: 64 clients upload a 12 MP image at once to a server with the default admission
   (16 slots, 2 decodes): statuses, time to the 429 status line (from the request's headers,
   the upload still going), peak RSS over the baseline, most decodes alive at once.
3. **Load**: rounds of N clients x M requests (mixed cold/warm images, small cache so it is
   full): statuses and RSS after each round.

Writes JSON (``--json``) and a markdown table (``--markdown``, also printed). Numbers in
benchmarks/RESULTS.md#hostile-traffic come from this command.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import io
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import httpx
import numpy as np
from PIL import Image

MB = 1 << 20
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- server process
class Server:
    def __init__(self, bundle: Path, env: dict[str, str], workdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        full = {k: v for k, v in os.environ.items() if not k.startswith("SAM3_")}
        full.update(SAM3_LOG_LEVEL="warning", SAM3_ID_SECRET_FILE=str(workdir / "id-secret"), **env)
        self.log = open(workdir / f"server-{self.port}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--bundle", str(bundle), "--port", str(self.port)],
            cwd=REPO, env=full, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server not ready")

    def status(self) -> dict[str, int]:
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
        return out

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def smooth_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A photo-like JPEG (smooth colour fields): large in pixels, a few MB in bytes."""
    rng = np.random.default_rng(seed)
    small = (rng.random((height // 64 + 2, width // 64 + 2, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def noise_jpeg(width: int, height: int, seed: int) -> bytes:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def with_comment(jpeg: bytes, text: str) -> bytes:
    payload = text.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def multipart(data: bytes, prompts: Sequence[str], boundary: str = "hostileboundary") -> bytes:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n{p}\r\n'.encode() for p in prompts]
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return b"".join(parts) + head + data + f"\r\n--{boundary}--\r\n".encode()


# --------------------------------------------------------------------------- measurements
def big_request(bundle: Path, workdir: Path) -> dict[str, Any]:
    server = Server(bundle, {"SAM3_MAX_MEGAPIXELS": "40", "SAM3_MAX_UPLOAD_BYTES": str(32 * MB),
                             "SAM3_REQUEST_TIMEOUT_S": "600"}, workdir)
    try:
        data = smooth_jpeg(7744, 5164)
        prompts = [f"thing {i}" for i in range(16)]
        with httpx.Client(base_url=server.url, timeout=900) as c:
            c.post("/segment", files={"image": ("w.jpg", smooth_jpeg(320, 240, 1), "image/jpeg")}, data={"prompt": "x"})
            before = server.status()["VmRSS"]
            server.reset_peak()
            started = time.perf_counter()
            r = c.post("/segment", files={"image": ("a.jpg", data, "image/jpeg")},
                       data={"prompt": prompts, "score_threshold": "0"})
            seconds = time.perf_counter() - started
            peak = server.status()["VmHWM"]
            body = r.json()
            masks = sum(len(x["detections"]) for x in body["results"])
            per_mask = {}
            for n in (2, 16):
                doc = c.post("/segment", json={"image_id": body["image_id"], "prompts": prompts[:n],
                                               "score_threshold": 0.0}).json()
                count = sum(len(x["detections"]) for x in doc["results"])
                per_mask[n] = round(doc["timings_ms"]["postprocess"] / count, 2)
        return {
            "image": "7744x5164 JPEG", "jpeg_mb": round(len(data) / 1e6, 2), "prompts": 16, "masks": masks,
            "status": r.status_code, "peak_added_mb": round((peak - before) / MB, 1), "seconds": round(seconds, 2),
            "response_mb": round(len(r.content) / 1e6, 1), "timings_ms": body["timings_ms"],
            "encode_ms_per_mask": {f"{n} prompts": v for n, v in per_mask.items()},
        }
    finally:
        server.stop()


def _upload_and_time(url: str, body: bytes) -> tuple[int, float]:
    """(status, seconds from the request's headers to the response's status line) while the body
    is still being sent by another thread."""
    host, port = url.rsplit("/", 1)[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=600)
    head = (f"POST /segment HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: multipart/form-data; boundary=hostileboundary\r\n\r\n").encode()
    started = time.perf_counter()
    sock.sendall(head)

    def send_body() -> None:
        try:
            sock.sendall(body)
        except OSError:
            pass  # answered and closed before the upload ended

    sender = threading.Thread(target=send_body, daemon=True)
    sender.start()
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    elapsed = time.perf_counter() - started
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    sender.join(600)
    sock.close()
    return status, elapsed


def burst(bundle: Path, workdir: Path, clients: int = 64) -> dict[str, Any]:
    width, height = 4000, 3000
    env = {"SAM3_QUEUE_SIZE": "16", "SAM3_DECODE_CONCURRENCY": "2", "SAM3_MAX_MEGAPIXELS": "24",
           "SAM3_MAX_UPLOAD_BYTES": str(8 * MB), "SAM3_REQUEST_TIMEOUT_S": "600"}
    server = Server(bundle, env, workdir)
    try:
        jpeg = smooth_jpeg(width, height, 2)
        with httpx.Client(base_url=server.url, timeout=600) as c:
            c.post("/segment", files={"image": ("w.jpg", with_comment(jpeg, "warm"), "image/jpeg")}, data={"prompt": "x"})
        baseline = server.status()["VmRSS"]
        server.reset_peak()
        bodies = [multipart(with_comment(jpeg, f"burst {i}"), ["cat"]) for i in range(clients)]
        gate = threading.Barrier(clients)

        def one(i: int) -> tuple[int, float]:
            gate.wait()
            return _upload_and_time(server.url, bodies[i])

        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(one, range(clients)))
        peak = server.status()["VmHWM"]
        info = httpx.get(f"{server.url}/info").json()
        metrics = httpx.get(f"{server.url}/metrics").text
        rejected = sorted(s for code, s in results if code == 429)
        # The server's own view: its latency histogram of the 429s (headers parsed -> answer sent).
        served_within = {}
        for le in ("0.005", "0.01", "0.05"):
            match = re.search(r'sam3_request_duration_seconds_bucket\{le="%s",method="POST",route="/segment",'
                              r'status="429"\} ([0-9.]+)' % re.escape(le), metrics)
            served_within[f"{float(le) * 1e3:g} ms"] = int(float(match.group(1))) if match else 0
        admitted_bound = 16 * len(bodies[0]) + 2 * 8 * width * height
        return {
            "clients": clients, "image": f"{width}x{height} JPEG", "upload_mb": round(len(bodies[0]) / 1e6, 2),
            "statuses": dict(collections.Counter(code for code, _ in results)),
            "429_ms": {"median": round(statistics.median(rejected) * 1e3, 1) if rejected else None,
                       "p95": round(rejected[int(0.95 * (len(rejected) - 1))] * 1e3, 1) if rejected else None,
                       "max": round(rejected[-1] * 1e3, 1) if rejected else None},
            "server_429_within": served_within,
            "baseline_rss_mb": round(baseline / MB, 1), "peak_added_mb": round((peak - baseline) / MB, 1),
            "formula_bound_mb": round(admitted_bound / MB, 1), "decoding_peak": info["admission"]["decoding_peak"],
        }
    finally:
        server.stop()


def load(bundle: Path, workdir: Path, rounds: int, clients: int, requests: int) -> dict[str, Any]:
    server = Server(bundle, {"SAM3_QUEUE_SIZE": "16", "SAM3_CACHE_BYTES": str(4 * MB)}, workdir)
    warm_images = [noise_jpeg(160, 120, 9000 + i) for i in range(4)]

    def client(n: int, round_: int) -> list[int]:
        rng = random.Random(n * 1000 + round_)
        codes = []
        with httpx.Client(base_url=server.url, timeout=120) as c:
            for i in range(requests):
                if rng.random() < 0.3:
                    data = noise_jpeg(rng.choice([96, 160, 320]), 120, 100_000 + round_ * 100_000 + n * 1000 + i)
                else:
                    data = warm_images[rng.randrange(len(warm_images))]
                r = c.post("/segment", files={"image": ("a.jpg", data, "image/jpeg")},
                           data={"prompt": [rng.choice(["cat", "dog", "a red car", "person", "tree"])],
                                 "score_threshold": "0.2", "mask_format": rng.choice(["rle", "none"])})
                codes.append(r.status_code)
        return codes

    try:
        out = []
        for round_ in range(rounds):
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                codes = [code for batch in pool.map(lambda n: client(n, round_), range(clients)) for code in batch]
            seconds = time.perf_counter() - started
            cache = httpx.get(f"{server.url}/info").json()["cache"]
            out.append({"round": round_ + 1, "requests": len(codes), "statuses": dict(collections.Counter(codes)),
                        "rps": round(len(codes) / seconds, 1), "rss_mb": round(server.status()["VmRSS"] / MB, 1),
                        "cache_bytes": cache["bytes"], "cache_evictions": cache["evictions"]})
        return {"rounds": out, "clients": clients, "requests_per_client": requests, "cache_capacity_bytes": 4 * MB}
    finally:
        server.stop()


def markdown(doc: dict[str, Any]) -> str:
    big, b, ld = doc.get("big_request"), doc.get("burst"), doc.get("load")
    lines = []
    if big:
        lines += ["| 40 MP request | value |", "|---|---|",
                  f"| image, prompts, masks | {big['image']} ({big['jpeg_mb']} MB), {big['prompts']} at score 0, {big['masks']} |",
                  f"| peak RSS added | {big['peak_added_mb']} MB |",
                  f"| time (image encoder / mask encoding) | {big['seconds']} s ({big['timings_ms']['image_encoder'] / 1e3:.1f} / {big['timings_ms']['postprocess'] / 1e3:.1f} s) |",
                  f"| answer | {big['response_mb']} MB of RLE |",
                  f"| encoding per mask, 2 vs 16 prompts | {big['encode_ms_per_mask']['2 prompts']} / {big['encode_ms_per_mask']['16 prompts']} ms |", ""]
    if b:
        lines += ["| 64-burst | value |", "|---|---|",
                  f"| uploads | {b['clients']} x {b['image']} ({b['upload_mb']} MB) |",
                  f"| statuses | {b['statuses']} |",
                  f"| 429 at the client, from its headers sent: median / p95 / max | {b['429_ms']['median']} / {b['429_ms']['p95']} / {b['429_ms']['max']} ms |",
                  f"| 429 in the server (request to answer), of {b['statuses'].get(429, 0)} | " + ", ".join(
                      f"{n} within {k}" for k, n in b['server_429_within'].items()) + " |",
                  f"| peak RSS over the baseline ({b['baseline_rss_mb']} MB) | {b['peak_added_mb']} MB (formula bound {b['formula_bound_mb']} MB) |",
                  f"| most decodes at once | {b['decoding_peak']} |", ""]
    if ld:
        lines += [f"| load round ({ld['clients']} clients x {ld['requests_per_client']}) | statuses | req/s | RSS after | cache bytes |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['round']} | {r['statuses']} | {r['rps']} | {r['rss_mb']} MB | {r['cache_bytes']} |" for r in ld["rounds"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hostile", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--only", choices=("big", "burst", "load"), action="append")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="per client and round")
    parser.add_argument("--json", dest="json_out", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    only = set(args.only or ("big", "burst", "load"))
    doc: dict[str, Any] = {"bundle": str(args.bundle), "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "big" in only:
            doc["big_request"] = big_request(args.bundle, work)
        if "burst" in only:
            doc["burst"] = burst(args.bundle, work)
        if "load" in only:
            doc["load"] = load(args.bundle, work, args.rounds, args.clients, args.requests)
    table = markdown(doc)
    print(table)
    if args.json_out:
        args.json_out.write_text(json.dumps(doc, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
