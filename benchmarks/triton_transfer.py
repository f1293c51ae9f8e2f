"""``python -m benchmarks.triton_transfer``: what a warm decode call costs in transfer alone.

With the server's ``--backend triton`` the image embedding lives in OUR cache and travels with
every decode call (engines/triton.py). This measures that price without any compute: a real
tritonserver (deploy/triton/local.py) serves an echo model with the decoder's exact inputs and
outputs at a model shape (SAM3-Small 252 px, full SAM3 1008 px), returning preallocated zeros,
and a gRPC client sends one warm call's tensors (4 embedding tensors + 1 prompt) N times.

Two ways are measured:
- ``grpc``: tensors in the request and the response (what the triton backend does; any
  Triton, any host);
- ``system_shm``: the embedding and the outputs in POSIX shared memory registered with Triton
  once (only when client and Triton share a host); the request carries region references.

The echo runs in Triton's Python backend, which copies inputs and outputs through its own
shared memory, so these figures are an upper bound for the TensorRT/ONNX Runtime backends on
the same host; across a network add bytes / bandwidth (printed for 1 and 10 Gbit/s).

    python -m benchmarks.triton_transfer --shape small full --calls 20 --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.stats import summarize
from benchmarks.system import system_info

# (image size, FPN channels, queries) per shape; g = S / 14, FPN levels 4g, 2g, g; masks 4g.
SHAPES = {"small": (252, 256, 100), "full": (1008, 256, 200)}
TEXT_LEN = 32

ECHO_MODEL = '''
import json
import numpy as np
import triton_python_backend_utils as pb_utils
from sam3_tensors import to_tensor


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.outputs = [(o["name"], [abs(d) for d in o["dims"]]) for o in config["output"]]
        self.zeros = {name: np.zeros(dims, dtype=np.float32) for name, dims in self.outputs}

    def execute(self, requests):
        return [pb_utils.InferenceResponse([to_tensor(name, self.zeros[name]) for name, _ in self.outputs])
                for _ in requests]
'''


def decoder_tensors(shape: str) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    size, channels, queries = SHAPES[shape]
    g = size // 14
    inputs = {
        "fpn_0": [1, channels, 4 * g, 4 * g],
        "fpn_1": [1, channels, 2 * g, 2 * g],
        "fpn_2": [1, channels, g, g],
        "geometry_cls": [1, 1, channels],
        "text_features": [1, TEXT_LEN, channels],
        "text_mask": [1, TEXT_LEN],
    }
    outputs = {
        "pred_masks": [1, queries, 4 * g, 4 * g],
        "pred_boxes": [1, queries, 4],
        "pred_logits": [1, queries],
        "presence_logits": [1, 1],
    }
    return inputs, outputs


def write_echo_repository(root: Path, shapes: Sequence[str]) -> None:
    from export.triton import MODELS_SRC, Enum, to_pbtxt, validate_pbtxt

    for shape in shapes:
        inputs, outputs = decoder_tensors(shape)
        model = root / f"echo_{shape}"
        (model / "1").mkdir(parents=True)
        config = {
            "name": f"echo_{shape}", "backend": "python", "max_batch_size": 0,
            "input": [{"name": n, "data_type": Enum("TYPE_INT32" if n == "text_mask" else "TYPE_FP32"), "dims": d}
                      for n, d in inputs.items()],
            "output": [{"name": n, "data_type": Enum("TYPE_FP32"), "dims": d} for n, d in outputs.items()],
            "instance_group": [{"kind": Enum("KIND_CPU"), "count": 1}],
        }
        text = to_pbtxt(config)
        validate_pbtxt(text)
        (model / "config.pbtxt").write_text(text)
        (model / "1" / "model.py").write_text(ECHO_MODEL)
        (model / "1" / "sam3_tensors.py").write_bytes((MODELS_SRC / "sam3_tensors.py").read_bytes())


def measure(url: str, shape: str, calls: int, warmup: int) -> dict[str, Any]:
    import tritonclient.grpc as grpcclient
    import tritonclient.utils.shared_memory as shm

    inputs, outputs = decoder_tensors(shape)
    rng = np.random.default_rng(0)
    arrays = {n: (np.ones(d, dtype=np.int32) if n == "text_mask" else rng.standard_normal(d, dtype=np.float32))
              for n, d in inputs.items()}
    embedding = ("fpn_0", "fpn_1", "fpn_2", "geometry_cls")
    bytes_in = sum(a.nbytes for a in arrays.values())
    bytes_out = sum(int(np.prod(d)) * 4 for d in outputs.values())
    client = grpcclient.InferenceServerClient(
        url, channel_args=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
    model = f"echo_{shape}"
    requested = [grpcclient.InferRequestedOutput(n) for n in outputs]

    def grpc_call() -> None:
        items = []
        for name, array in arrays.items():
            item = grpcclient.InferInput(name, list(array.shape), grpcclient.np_to_triton_dtype(array.dtype))
            item.set_data_from_numpy(array)
            items.append(item)
        result = client.infer(model, items, outputs=requested)
        assert result.as_numpy("pred_masks").shape == tuple(outputs["pred_masks"])

    # Co-located: the cached embedding sits in a registered region (written once, as the
    # server's cache would hold it); the prompt's tensors and the outputs use regions too.
    regions = []
    try:
        handles = {}
        for name, array in {**arrays, **{n: np.zeros(d, np.float32) for n, d in outputs.items()}}.items():
            key = f"/sam3_bench_{shape}_{name}"
            handle = shm.create_shared_memory_region(key, key, array.nbytes)
            client.register_system_shared_memory(key, key, array.nbytes)
            regions.append((key, handle))
            handles[name] = (key, handle, array)
            if name in arrays:
                shm.set_shared_memory_region(handle, [array])

        def shm_call() -> None:
            items = []
            for name, array in arrays.items():
                key, handle, _ = handles[name]
                if name not in embedding:  # the prompt changes per call: written each time
                    shm.set_shared_memory_region(handle, [array])
                item = grpcclient.InferInput(name, list(array.shape), grpcclient.np_to_triton_dtype(array.dtype))
                item.set_shared_memory(key, array.nbytes)
                items.append(item)
            wanted = []
            for name in outputs:
                key, handle, zero = handles[name]
                out = grpcclient.InferRequestedOutput(name)
                out.set_shared_memory(key, zero.nbytes)
                wanted.append(out)
            client.infer(model, items, outputs=wanted)
            key, handle, zero = handles["pred_masks"]
            masks = shm.get_contents_as_numpy(handle, np.float32, outputs["pred_masks"])
            assert masks.shape == tuple(outputs["pred_masks"])

        results = {}
        for way, call in (("grpc", grpc_call), ("system_shm", shm_call)):
            for _ in range(warmup):
                call()
            samples = []
            for _ in range(calls):
                started = time.perf_counter()
                call()
                samples.append((time.perf_counter() - started) * 1e3)
            results[way] = summarize(samples)
    finally:
        for key, handle in regions:
            try:
                client.unregister_system_shared_memory(key)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
            shm.destroy_shared_memory_region(handle)
    size, channels, queries = SHAPES[shape]
    return {
        "shape": shape, "image_size": size, "queries": queries,
        "embedding_bytes": int(sum(arrays[n].nbytes for n in embedding)),
        "bytes_in": int(bytes_in), "bytes_out": int(bytes_out), "calls": calls, "ms": results,
        "network_ms": {f"{gbit}gbit": round((bytes_in + bytes_out) * 8 / (gbit * 1e9) * 1e3, 1) for gbit in (1, 10)},
    }


def markdown(document: dict[str, Any]) -> str:
    lines = [
        "| shape | embedding sent per warm call | request / response bytes | gRPC p50 (p90) ms | system shm p50 (p90) ms | + wire at 1 / 10 Gbit/s |",
        "|---|---|---|---|---|---|",
    ]
    for row in document["rows"]:
        g, s = row["ms"]["grpc"], row["ms"]["system_shm"]
        lines.append(
            f"| {row['shape']} ({row['image_size']} px, {row['queries']} queries, 1 prompt) "
            f"| {row['embedding_bytes'] / 1e6:.1f} MB | {row['bytes_in'] / 1e6:.1f} / {row['bytes_out'] / 1e6:.1f} MB "
            f"| {g['p50']:.1f} ({g['p90']:.1f}) | {s['p50']:.1f} ({s['p90']:.1f}) "
            f"| {row['network_ms']['1gbit']:.0f} / {row['network_ms']['10gbit']:.0f} ms |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.triton_transfer", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", dest="json_out", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.calls < 1 or args.warmup < 0:
        print("error: --calls >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    from deploy.triton.local import LocalTriton, TritonUnavailable

    with tempfile.TemporaryDirectory(prefix="sam3-transfer-") as tmp:
        repository = Path(tmp) / "repository"
        write_echo_repository(repository, args.shape)
        try:
            server = LocalTriton(repository).start()
        except (TritonUnavailable, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        try:
            rows = [measure(server.grpc_url, shape, args.calls, args.warmup) for shape in args.shape]
        finally:
            server.stop()
    document = {"benchmark": "triton_transfer", "system": system_info(), "rows": rows}
    table = markdown(document)
    print(table, end="")
    if args.json_out:
        args.json_out.write_text(json.dumps(document, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
