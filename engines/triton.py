"""Triton backend: the bundle's three parts run as models on a (remote) Triton Inference Server.

``python -m export triton BUNDLE OUT`` writes the model repository; this module is the client
side (KServe v2 over gRPC, ``tritonclient``, imported lazily so the rest of ``engines`` works
without it). Preprocessing, tokenisation, postprocessing and the server's embedding cache stay
here, in front: only ``run(inputs) -> outputs`` of each part crosses the network.

Where image embeddings live (measured, benchmarks/RESULTS.md "Triton"): in OUR cache, and the
decoder's image inputs are sent with every decode call. Triton stays stateless, so any replica
serves any request and a Triton restart loses nothing; the price is the embedding's bytes on
the wire per warm call (SAM3-Small 7 MB fp32, full SAM3 ~112 MB fp32). The docs show the
measured per-call cost and when to co-locate instead.

The naming and the config parameters below are the contract between the repository writer
(export/triton.py) and this client: the client refuses a model whose ``sam3_part_sha256``
parameter is not its bundle's graph, as the bundle reader refuses a corrupt file.

Failures are typed for the server: Triton unreachable, or gone mid-call, is
:class:`BackendUnavailable` (HTTP 503) after at most the call timeout, never a hang.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from engines.backend import MemoryReport, host_rss_bytes, validate_inputs
from engines.bundle import BATCH, MANIFEST_FILE, PART_NAMES, Bundle, Manifest, PartSpec, sha256_file
from engines.errors import BackendUnavailable, BundleError, EngineError

log = logging.getLogger("engines.triton")

DEFAULT_PREFIX = "sam3"
DEFAULT_URL = "127.0.0.1:8001"

# numpy dtype name <-> Triton model-config / KServe v2 names.
CONFIG_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
}
WIRE_DTYPES = {
    "float32": "FP32",
    "float16": "FP16",
    "int32": "INT32",
    "int64": "INT64",
    "bool": "BOOL",
    "uint8": "UINT8",
}

# Config parameters written by export/triton.py and checked here.
PARAM_PART = "sam3_part"
PARAM_SHA256 = "sam3_part_sha256"
PARAM_WEIGHTS = "sam3_weights_sha256"
PARAM_PRECISION = "sam3_precision"
PARAM_BUNDLE = "sam3_bundle"
PARAM_MAX_BATCH = "sam3_max_batch"


def model_name(prefix: str, part: str) -> str:
    """``sam3_image_encoder`` etc.: a prefix per bundle lets several bundles share one Triton."""
    if part not in PART_NAMES:
        raise EngineError(f"unknown part {part!r}")
    return f"{prefix}_{part}"


def request_model_name(prefix: str) -> str:
    """The whole-request model (image bytes + JSON request -> JSON document): the prefix alone."""
    return prefix


def triton_batching(spec: PartSpec) -> bool:
    """Whether Triton may batch this part across requests (``max_batch_size > 0``).

    Triton's batching concatenates EVERY input along axis 0, so a part qualifies only when all
    its inputs and outputs carry the batch axis first. The decoder does not: its image features
    have batch 1 and are broadcast inside the graph over the prompt batch (one image, N
    prompts, one launch), so requests for different images cannot be stacked; its prompt batch
    is already one call per image.
    """
    tensors = (*spec.inputs, *spec.outputs)
    return all(t.shape and t.shape[0] == BATCH and BATCH not in t.shape[1:] for t in tensors)


def config_dims(spec: PartSpec, batched: bool) -> dict[str, list[int]]:
    """Per tensor the ``dims`` of config.pbtxt: batch axis dropped when Triton batches, else -1."""
    dims: dict[str, list[int]] = {}
    for tensor in (*spec.inputs, *spec.outputs):
        shape = tensor.shape[1:] if batched else tensor.shape
        dims[tensor.name] = [-1 if d == BATCH else int(d) for d in shape]
    return dims


# --------------------------------------------------------------------------- a manifest-only view


class ManifestView:
    """What the pipeline reads from a bundle (manifest + tokenizer), without the graphs.

    The whole-request Triton model holds the manifest and tokenizer but not the ONNX files
    (those are the part models'); the tokenizer's hash is still checked.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        path = self.root / MANIFEST_FILE
        try:
            self.manifest = Manifest.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise BundleError(f"cannot read {path}: {exc}") from exc
        if sha256_file(self.tokenizer_path) != self.manifest.tokenizer.sha256:
            raise BundleError(f"{self.tokenizer_path} does not match the manifest's sha256")

    def part(self, name: str) -> PartSpec:
        return self.manifest.part(name)

    def path(self, rel: str) -> Path:
        return self.root / rel

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.manifest.tokenizer.file


# --------------------------------------------------------------------------- gRPC client backend


def _grpc():
    try:
        import tritonclient.grpc as grpcclient
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BackendUnavailable(
            "the triton backend needs tritonclient: pip install -r requirements/runtime.txt"
        ) from exc
    return grpcclient


def _status(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    value = status() if callable(status) else status
    return str(value or "")


def _unreachable(exc: Exception) -> bool:
    """gRPC statuses that mean "no Triton there (any more)" rather than "this request failed"."""
    status = _status(exc)
    text = str(exc)
    return any(s in status or s in text for s in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"))


@dataclass
class RemoteModel:
    """What the client learnt about one part's model from Triton's config."""

    name: str
    max_batch_size: int
    precision: str
    parameters: dict[str, str]


class TritonPart:
    """One part as a remote Triton model; ``run`` is one gRPC ModelInfer call."""

    def __init__(self, backend: "TritonBackend", spec: PartSpec, remote: RemoteModel) -> None:
        self.backend = backend
        self.spec = spec
        self.remote = remote
        self.model = remote.name
        declared = int(remote.parameters.get(PARAM_MAX_BATCH, "0") or 0)
        # Batched models: Triton's max_batch_size; the decoder: the profile max the plan was
        # built with (recorded by the exporter), else the manifest's.
        self.max_batch = max(1, remote.max_batch_size or declared or spec.max_batch)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        validate_inputs(self.spec, inputs, self.max_batch)
        grpc = _grpc()
        request = []
        for tensor in self.spec.inputs:
            array = np.ascontiguousarray(inputs[tensor.name])
            item = grpc.InferInput(tensor.name, list(array.shape), WIRE_DTYPES[tensor.dtype])
            item.set_data_from_numpy(array)
            request.append(item)
        outputs = [grpc.InferRequestedOutput(t.name) for t in self.spec.outputs]
        result = self.backend.infer(self.model, request, outputs)
        out: dict[str, np.ndarray] = {}
        for tensor in self.spec.outputs:
            value = result.as_numpy(tensor.name)
            if value is None:
                raise EngineError(f"{self.model}: Triton returned no {tensor.name!r}")
            out[tensor.name] = value
        return out

    def close(self) -> None:
        pass


class TritonBackend:
    """The three parts on a Triton server at ``url`` (``host:port`` of its gRPC endpoint).

    ``load`` waits up to ``wait_s`` for the server and the part's model to be ready (the server
    stays "loading", /readyz 503, meanwhile), then checks the model against the manifest.
    ``timeout_s`` bounds every inference call: a dead or hung Triton costs at most that.
    """

    kind = "triton"

    def __init__(
        self,
        bundle: Bundle | ManifestView,
        url: str = DEFAULT_URL,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout_s: float = 30.0,
        wait_s: float = 60.0,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        if not url or "://" in url:
            raise BackendUnavailable(f"triton url must be host:port of the gRPC endpoint, got {url!r}")
        self.bundle = bundle
        self.url = url
        self.prefix = prefix
        self.timeout_s = float(timeout_s)
        self.wait_s = float(wait_s)
        self.on_wait = on_wait
        grpc = _grpc()
        # Embeddings of full-size SAM3 are ~112 MB per decode call: lift gRPC's 4 MB default.
        self._client = grpc.InferenceServerClient(
            url,
            channel_args=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
        )
        self._parts: dict[str, TritonPart] = {}
        self.server_version = ""
        self.calls = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- protocol ----------------------------------------------------------------------------
    @property
    def precision(self) -> str:
        precisions = sorted({p.remote.precision for p in self._parts.values()})
        return "+".join(precisions) if precisions else "fp32"

    @property
    def device(self) -> str:
        return f"triton {self.server_version or '?'} at {self.url}"

    def load(self, part: str) -> TritonPart:
        if part in self._parts:
            return self._parts[part]
        spec = self.bundle.part(part)
        name = model_name(self.prefix, part)
        self._wait_ready(name)
        remote = self._check_model(name, spec)
        runner = TritonPart(self, spec, remote)
        self._parts[part] = runner
        return runner

    def memory(self) -> MemoryReport:
        return MemoryReport(host_rss_bytes=host_rss_bytes())

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "device": self.device,
            "precision": self.precision,
            "url": self.url,
            "models": {p: r.model for p, r in self._parts.items()},
            "triton": self.server_version,
        }

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # noqa: BLE001 - closing anyway
            pass

    # -- health ------------------------------------------------------------------------------
    def ready(self, timeout_s: float = 2.0) -> bool:
        """Server up and every loaded part's model ready (what the server's /readyz asks)."""
        try:
            if not self._client.is_server_ready(client_timeout=timeout_s):
                return False
            return all(self._client.is_model_ready(r.model, client_timeout=timeout_s) for r in self._parts.values())
        except Exception:  # noqa: BLE001 - any failure to answer is "not ready"
            return False

    # -- calls -------------------------------------------------------------------------------
    def infer(self, model: str, inputs: list[Any], outputs: list[Any]) -> Any:
        self.calls += 1
        self.bytes_sent += sum(_input_bytes(i) for i in inputs)
        try:
            result = self._client.infer(model, inputs, outputs=outputs, client_timeout=self.timeout_s)
        except Exception as exc:  # tritonclient raises InferenceServerException
            if _unreachable(exc):
                raise BackendUnavailable(
                    f"Triton at {self.url} did not answer {model} within {self.timeout_s:g} s: {_short(exc)}"
                ) from None
            raise EngineError(f"{model}: Triton failed: {_short(exc)}") from None
        response = result.get_response()
        self.bytes_received += sum(len(c) for c in getattr(response, "raw_output_contents", []))
        return result

    def _wait_ready(self, name: str) -> None:
        deadline = time.monotonic() + self.wait_s
        said = 0.0
        last = ""
        while True:
            try:
                if self._client.is_server_ready(client_timeout=2.0) and self._client.is_model_ready(
                    name, client_timeout=2.0
                ):
                    if not self.server_version:
                        self.server_version = str(self._client.get_server_metadata(client_timeout=2.0).version)
                    return
                last = f"model {name} is not ready"
            except Exception as exc:  # noqa: BLE001 - keep waiting until the deadline
                last = f"Triton at {self.url} is unreachable ({_short(exc)})"
            now = time.monotonic()
            if now >= deadline:
                raise BackendUnavailable(f"{last} after waiting {self.wait_s:g} s")
            if now - said >= 10.0:
                said = now
                log.info("waiting for Triton: %s", last)
                if self.on_wait is not None:
                    self.on_wait(last)
            time.sleep(min(0.5, max(0.0, deadline - now)))

    def _check_model(self, name: str, spec: PartSpec) -> RemoteModel:
        try:
            config = self._client.get_model_config(name, as_json=True, client_timeout=10.0)["config"]
        except Exception as exc:  # noqa: BLE001
            raise BackendUnavailable(f"cannot read the config of {name} from {self.url}: {_short(exc)}") from None
        parameters = {k: str(v.get("string_value", "")) for k, v in (config.get("parameters") or {}).items()}
        problems = expected_config_problems(spec, config)
        digest = parameters.get(PARAM_SHA256)
        if digest != spec.sha256:
            problems.append(
                f"its {PARAM_SHA256} is {digest!r}, the bundle's {spec.name} graph is {spec.sha256[:16]}...: "
                "the repository was exported from another bundle"
            )
        if problems:
            raise BundleError(f"Triton model {name} does not serve this bundle: " + "; ".join(problems))
        return RemoteModel(
            name=name,
            max_batch_size=int(config.get("max_batch_size", 0) or 0),
            precision=parameters.get(PARAM_PRECISION, "fp32") or "fp32",
            parameters=parameters,
        )


def expected_config_problems(spec: PartSpec, config: Mapping[str, Any]) -> list[str]:
    """Differences between a Triton model config (JSON form) and the part's tensor contract."""
    problems: list[str] = []
    batched = int(config.get("max_batch_size", 0) or 0) > 0
    dims = config_dims(spec, batched)
    for key, tensors in (("input", spec.inputs), ("output", spec.outputs)):
        remote = {t.get("name"): t for t in config.get(key) or []}
        for tensor in tensors:
            found = remote.get(tensor.name)
            if found is None:
                problems.append(f"no {key} {tensor.name!r}")
                continue
            dtype = found.get("data_type")
            if dtype != CONFIG_DTYPES[tensor.dtype]:
                problems.append(f"{key} {tensor.name!r} is {dtype}, expected {CONFIG_DTYPES[tensor.dtype]}")
            got = [int(d) for d in found.get("dims", [])]
            if got != dims[tensor.name]:
                problems.append(f"{key} {tensor.name!r} has dims {got}, expected {dims[tensor.name]}")
    return problems


def _input_bytes(item: Any) -> int:
    raw = getattr(item, "_raw_content", None)
    return len(raw) if raw is not None else 0


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
