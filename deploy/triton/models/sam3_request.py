"""Triton Python-backend model: a whole segmentation request, for plain Triton clients.

Written as ``<prefix>/1/model.py`` by ``python -m export triton``, beside a copy of ``engines/``
and of the bundle's manifest + tokenizer. It is ``Sam3Pipeline`` itself (our preprocessing,
tokenizer, postprocessing and result document) over a backend whose three parts are the
repository's other models, called by BLS (``pb_utils.InferenceRequest``): so the answer is the
one ``python -m engines segment`` and the server give, and the heavy parts keep Triton's
batching and placement.

Inputs (KServe v2; JSON travels as UINT8, see sam3_tensors.py for why not BYTES):
    image    UINT8 [-1]  the encoded image file (JPEG/PNG/...); optional with ``image_id``
    request  UINT8 [-1]  UTF-8 JSON: {"prompts": [...] (strings, or {"boxes": [[x0, y0, x1, y1]],
                         "labels": [1], "text": "..."} as the server takes them), "score_threshold": 0.5,
                         "mask_threshold": 0.5, "max_detections": 100, "mask_format": "rle",
                         "image_id": "<sha256 of an image sent before>"}
Output:
    result   UINT8 [-1]  UTF-8 JSON: the server's /segment document (image_id, image_size,
                         cache_hit, results, timings_ms, model)

Embeddings of the last ``embedding_cache_entries`` images (config parameter) stay in this
instance, keyed by the image bytes' sha256: a follow-up request may send ``image_id`` instead
of the image (a miss is an error ``image_not_cached``: resend the image).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from sam3_tensors import error_response, input_array, to_numpy, to_tensor

from engines.backend import MemoryReport, host_rss_bytes, validate_inputs
from engines.bundle import PART_NAMES, sha256_bytes
from engines.errors import EngineError, InvalidInput, Sam3Error
from engines.options import Limits, SegmentOptions
from engines.pipeline import Sam3Pipeline
from engines.postprocess import result_document
from engines.triton import ManifestView, model_name
from engines.types import Prompt, add_timings


class ImageNotCached(InvalidInput):
    code = "image_not_cached"


OPTION_KEYS = ("score_threshold", "mask_threshold", "max_detections")
REQUEST_KEYS = {"prompts", "mask_format", "image_id", *OPTION_KEYS}


class BlsPart:
    """A part as a BLS call to the model that serves it in the same Triton."""

    def __init__(self, model: str, spec, max_batch: int) -> None:
        self.model = model
        self.spec = spec
        self.max_batch = max(1, int(max_batch))

    def run(self, inputs):
        validate_inputs(self.spec, inputs, self.max_batch)
        request = pb_utils.InferenceRequest(
            model_name=self.model,
            requested_output_names=list(self.spec.output_names),
            inputs=[to_tensor(t.name, inputs[t.name]) for t in self.spec.inputs],
        )
        response = request.exec()
        if response.has_error():
            raise EngineError(f"{self.model}: {response.error().message()}")
        # Copies: embeddings outlive the response (this model caches them).
        return {
            name: to_numpy(pb_utils.get_output_tensor_by_name(response, name), copy=True)
            for name in self.spec.output_names
        }

    def close(self) -> None:
        pass


class BlsBackend:
    kind = "triton"

    def __init__(self, view: ManifestView, prefix: str, max_batch: dict, precision: str) -> None:
        self.view = view
        self.prefix = prefix
        self.max_batch = max_batch
        self.precision = precision
        self.device = "triton (BLS)"

    def load(self, part: str) -> BlsPart:
        if part not in PART_NAMES:  # the repository serves the three text-path parts
            raise EngineError(f"the Triton repository serves no {part} model")
        spec = self.view.part(part)
        return BlsPart(model_name(self.prefix, part), spec, self.max_batch.get(part, spec.max_batch))

    def memory(self) -> MemoryReport:
        return MemoryReport(host_rss_bytes=host_rss_bytes())

    def describe(self) -> dict:
        return {"kind": self.kind, "device": self.device, "precision": self.precision}

    def close(self) -> None:
        pass


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        here = Path(args["model_repository"]) / args["model_version"]
        parameters = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        prefix = parameters.get("sam3_prefix", config["name"])
        max_batch = {p: int(parameters.get(f"sam3_max_batch_{p}", "0") or 0) or 1 for p in PART_NAMES}
        view = ManifestView(here / "bundle")
        backend = BlsBackend(view, prefix, max_batch, parameters.get("sam3_precision", "fp32"))
        self.max_megapixels = float(parameters.get("max_megapixels", "40") or 40)
        # The request's limits are the pipeline's: it checks prompts, boxes and options once.
        self.pipeline = Sam3Pipeline(
            view,  # type: ignore[arg-type] - the pipeline reads only the manifest and tokenizer
            backend,  # type: ignore[arg-type]
            limits=Limits(
                max_megapixels=self.max_megapixels,
                max_prompts=int(parameters.get("max_prompts", "16") or 16),
                max_prompt_chars=int(parameters.get("max_prompt_chars", "200") or 200),
                max_detections=int(parameters.get("max_detections", "100") or 100),
            ),
        )
        self.cache_entries = int(parameters.get("embedding_cache_entries", "4") or 0)
        self.cache: OrderedDict = OrderedDict()
        self.model_info = {"name": view.manifest.name, "backend": "triton", "precision": backend.precision}

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                document = self._segment(request)
            except Sam3Error as exc:
                invalid = isinstance(exc, InvalidInput)
                responses.append(error_response(f"{exc.code}: {exc}", invalid_argument=invalid))
                continue
            except Exception as exc:  # noqa: BLE001 - one bad request must not kill the model
                responses.append(error_response(f"internal_error: {type(exc).__name__}: {exc}"))
                continue
            payload = np.frombuffer(json.dumps(document).encode("utf-8"), dtype=np.uint8)
            responses.append(pb_utils.InferenceResponse([to_tensor("result", payload)]))
        return responses

    def _segment(self, request) -> dict:
        started = time.perf_counter()
        body = _request_json(input_array(request, "request"))
        mask_format = body.get("mask_format", "rle")
        options = SegmentOptions(**{k: body[k] for k in OPTION_KEYS if k in body}, with_masks=mask_format != "none")
        # Checked before any image work, as the server does; box bounds once the image is known.
        prompts = self.pipeline.check_prompts(_prompts(body.get("prompts", [])))
        options = self.pipeline.check_options(options)
        image = input_array(request, "image")
        data = b"" if image is None else np.asarray(image, dtype=np.uint8).tobytes()
        image_timings: dict = {}  # the image encoder's, when this request ran it
        if data:
            image_id = sha256_bytes(data)
            embedding = self.cache.get(image_id)
            hit = embedding is not None
            if embedding is None:
                embedding = self.pipeline.encode_image(self.pipeline.load_image(data, image_id=image_id))
                image_timings = embedding.timings_ms
        else:
            image_id = body.get("image_id")
            if not isinstance(image_id, str) or not image_id:
                raise InvalidInput("send the image (input 'image') or the image_id of one sent before")
            embedding = self.cache.get(image_id)
            if embedding is None:
                raise ImageNotCached(f"image {image_id} is not cached here; send the image again")
            hit = True
        self._remember(image_id, embedding)
        result = self.pipeline.segment(embedding, prompts, options)
        width, height = (int(v) for v in result.image_size)
        document = {"image_id": image_id, "image_size": {"width": width, "height": height}, "cache_hit": hit}
        rendered = result_document(image_size=(width, height), results=result.results, mask_format=mask_format)
        document.update({k: v for k, v in rendered.items() if k not in document})
        stage_ms = add_timings(image_timings, result.timings_ms)
        stage_ms["total"] = (time.perf_counter() - started) * 1e3
        document["timings_ms"] = {k: round(float(v), 3) for k, v in stage_ms.items()}
        document["model"] = dict(self.model_info)
        return document

    def _remember(self, image_id: str, embedding) -> None:
        if self.cache_entries <= 0:
            return
        self.cache[image_id] = embedding
        self.cache.move_to_end(image_id)
        while len(self.cache) > self.cache_entries:
            self.cache.popitem(last=False)

    def finalize(self):
        self.cache.clear()


def _prompts(entries) -> list:
    """The server's prompt forms: a string, or {"boxes": [[x0, y0, x1, y1]], "labels": [1, 0],
    "text": "..."} (exemplar boxes, with or without text)."""
    if not isinstance(entries, list):
        raise InvalidInput("'prompts' is a list of strings or exemplar objects")
    return [Prompt.from_wire(entry.get("boxes") or [], entry.get("labels"), entry.get("text"), index)
            if isinstance(entry, dict) else entry for index, entry in enumerate(entries)]


def _request_json(array) -> dict:
    if array is None or array.size == 0:
        raise InvalidInput("input 'request' (UTF-8 JSON as UINT8) is required")
    try:
        body = json.loads(np.asarray(array, dtype=np.uint8).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"input 'request' is not UTF-8 JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidInput("input 'request' must be a JSON object")
    unknown = sorted(set(body) - REQUEST_KEYS)
    if unknown:
        raise InvalidInput(f"unknown request keys {unknown}; known: {sorted(REQUEST_KEYS)}")
    return body
