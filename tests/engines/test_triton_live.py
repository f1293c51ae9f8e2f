"""A real Triton Inference Server serving the repository ``python -m export triton`` wrote.

tritonserver comes from PyPI's nvidia-pytriton wheel (requirements/tritonserver.txt); the part
models run ONNX Runtime inside its Python backend (``--platform python``). Shown here:
- the pipeline on the ``triton`` backend gives the local pipeline's result document;
- the whole-request model answers a plain tritonclient call with that same document, and a
  follow-up by ``image_id`` hits its embedding cache;
- Triton's dynamic batcher really batches under 8 concurrent clients (its own metrics);
- a model from another bundle, or no Triton at all, is a clear error, not a hang.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from deploy.triton.local import parse_metric
from engines.options import SegmentOptions
from engines.bundle import Bundle
from engines.errors import BackendUnavailable, BundleError
from engines.pipeline import Sam3Pipeline
from engines.postprocess import result_document
from engines.triton import TritonBackend
from tests.triton_support import TEST_MAX_BATCH, local_triton, png_bytes, triton_repository  # noqa: F401

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient (requirements/runtime.txt)")

PROMPTS = ["a cat", "a red car", "person"]
OPTIONS = {"score_threshold": 0.0, "max_detections": 5}


def document(result) -> dict:
    return result_document(result.image_size, result.results)


@pytest.fixture(scope="module")
def local_pipeline(tiny_bundle):
    with Sam3Pipeline.from_bundle(tiny_bundle, "onnxruntime") as pipeline:
        yield pipeline


def test_triton_backend_gives_the_local_documents(tiny_bundle, local_triton, local_pipeline):
    bundle = Bundle(tiny_bundle)
    backend = TritonBackend(bundle, local_triton.grpc_url, wait_s=30)
    with Sam3Pipeline(bundle, backend) as remote:
        assert remote.backend.describe()["triton"] == "2.51.0"
        for seed in (0, 1):
            image = png_bytes(seed=seed)
            here = local_pipeline.segment(image, PROMPTS, SegmentOptions(**OPTIONS))
            there = remote.segment(image, PROMPTS, SegmentOptions(**OPTIONS))
            assert sum(len(r.detections) for r in there.results) > 0
            assert document(there) == document(here)  # same graphs, same inputs: bit-identical
        # N prompts within the decoder's batch are ONE remote decoder call, as locally.
        assert remote.stage_calls["decoder"] == 2
        assert backend.ready()


def infer_request_model(url: str, image: bytes | None, body: dict):
    client = grpcclient.InferenceServerClient(url)
    inputs = []
    if image is not None:
        item = grpcclient.InferInput("image", [len(image)], "UINT8")
        item.set_data_from_numpy(np.frombuffer(image, dtype=np.uint8))
        inputs.append(item)
    payload = np.frombuffer(json.dumps(body).encode("utf-8"), dtype=np.uint8)
    request = grpcclient.InferInput("request", [payload.size], "UINT8")
    request.set_data_from_numpy(payload)
    inputs.append(request)
    result = client.infer("sam3", inputs, client_timeout=60)
    return json.loads(result.as_numpy("result").tobytes().decode("utf-8"))


def test_whole_request_model_answers_a_plain_triton_client(local_triton, local_pipeline):
    image = png_bytes(seed=2)
    expected = document(local_pipeline.segment(image, PROMPTS, SegmentOptions(**OPTIONS)))
    cold = infer_request_model(local_triton.grpc_url, image, {"prompts": PROMPTS, **OPTIONS})
    assert cold["results"] == expected["results"] and cold["image_size"] == expected["image_size"]
    assert cold["cache_hit"] is False and cold["model"]["backend"] == "triton"
    # Follow-up prompt by image_id: no image sent, the embedding is Triton-side.
    warm = infer_request_model(local_triton.grpc_url, None, {"image_id": cold["image_id"], "prompts": ["a cat"], **OPTIONS})
    assert warm["cache_hit"] is True and warm["results"][0] == expected["results"][0]
    assert warm["timings_ms"]["image_encoder"] == 0.0


@pytest.mark.parametrize("body, code", [
    ({"prompts": []}, "invalid_prompt"),
    ({"prompts": ["x" * 500]}, "prompt_too_long"),
    ({"prompts": ["a"], "score_threshold": 2}, "invalid_option"),
    ({"prompts": ["a"], "colour": "red"}, "invalid_input"),
    ({"image_id": "0" * 64, "prompts": ["a"]}, "image_not_cached"),
    ({"prompts": "a cat"}, "invalid_input"),
    ({"prompts": ["a"], "max_detections": 10_000}, "invalid_option"),
    # the repository serves the text path only: a box prompt is refused by name, before any work
    ({"prompts": [{"boxes": [[1, 1, 20, 20]]}]}, "exemplars_unsupported"),
])
def test_whole_request_model_refuses_bad_input_by_name(local_triton, body, code):
    image = png_bytes(seed=3) if "image_id" not in body else None
    with pytest.raises(Exception) as info:
        infer_request_model(local_triton.grpc_url, image, body)
    assert code in str(info.value) and "INVALID_ARG" in str(info.value), str(info.value)


def counters(server, model: str) -> tuple[float, float]:
    text = server.metrics()
    return parse_metric(text, "nv_inference_count", model), parse_metric(text, "nv_inference_exec_count", model)


def test_dynamic_batching_batches_eight_concurrent_clients(tiny_bundle, local_triton):
    """8 clients, one prompt each per call, against the text and image encoders: Triton runs
    fewer executions than inferences (its nv_inference_exec_count vs nv_inference_count)."""
    manifest = Bundle(tiny_bundle).manifest
    clients, calls = 8, 6
    models = {
        "sam3_text_encoder": {t.name: np.ones(t.concrete_shape(1), dtype=t.dtype) for t in manifest.part("text_encoder").inputs},
        "sam3_image_encoder": {t.name: np.zeros(t.concrete_shape(1), dtype=t.dtype) for t in manifest.part("image_encoder").inputs},
    }
    before = {m: counters(local_triton, m) for m in models}
    errors: list[BaseException] = []
    start = threading.Barrier(clients)

    def client_loop() -> None:
        client = grpcclient.InferenceServerClient(local_triton.grpc_url)
        try:
            start.wait(timeout=30)
            for _ in range(calls):
                for model, feed in models.items():
                    inputs = []
                    for name, array in feed.items():
                        item = grpcclient.InferInput(name, list(array.shape), grpcclient.np_to_triton_dtype(array.dtype))
                        item.set_data_from_numpy(array)
                        inputs.append(item)
                    client.infer(model, inputs, client_timeout=60)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors[0]
    for model in models:
        inferences = counters(local_triton, model)[0] - before[model][0]
        executions = counters(local_triton, model)[1] - before[model][1]
        assert inferences == clients * calls
        assert executions < inferences, f"{model}: {executions} executions for {inferences} inferences: no batching"
        assert executions >= inferences / TEST_MAX_BATCH


def test_a_repository_from_another_bundle_is_refused(tiny_bundle, local_triton):
    import dataclasses

    bundle = Bundle(tiny_bundle)
    spec = bundle.manifest.part("decoder")
    other = dataclasses.replace(spec, sha256="f" * 64)

    class OtherBundle:
        manifest = bundle.manifest

        def part(self, name):
            return other if name == "decoder" else bundle.part(name)

    backend = TritonBackend(OtherBundle(), local_triton.grpc_url, wait_s=10)  # type: ignore[arg-type]
    with pytest.raises(BundleError, match="sam3_decoder does not serve this bundle"):
        backend.load("decoder")


def test_no_triton_is_a_clear_error_after_the_wait(tiny_bundle):
    from deploy.triton.local import free_port

    started = time.monotonic()
    backend = TritonBackend(Bundle(tiny_bundle), f"127.0.0.1:{free_port()}", wait_s=1.0)
    with pytest.raises(BackendUnavailable, match="unreachable"):
        backend.load("image_encoder")
    assert time.monotonic() - started < 10
