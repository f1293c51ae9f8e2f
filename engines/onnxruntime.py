"""ONNX Runtime backend: the bundle's fp32 graphs on TensorRT EP, CUDA EP or CPU.

This is the reference runtime (CI, laptops) and the Jetson fallback before plans are built.
Providers come from what the installed wheel offers, best first: the Jetson wheels from
jetson-ai-lab ship TensorRT and CUDA EPs, PyPI's ``onnxruntime`` only the CPU one.

CPU settings are measured, not folklore: the pipeline keeps three sessions alive, and ORT's
default intra-op thread pool spins after each op waiting for work. Three spinning pools on a
6-core Orin Nano fight for the cores: decoder latency went 41 -> 90 ms with spinning on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnxruntime as ort

from engines.backend import MemoryReport, cpu_count, host_rss_bytes, validate_inputs
from engines.bundle import Bundle, PartSpec
from engines.errors import BackendUnavailable, EngineError

TENSORRT_EP = "TensorrtExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
PROVIDER_PREFERENCE = (TENSORRT_EP, CUDA_EP, CPU_EP)
ORT_TRT_CACHE_DIR = "ort-trt"  # under BUNDLE/engines/, apart from our own plans


def preferred_providers(available: list[str] | None = None) -> list[str]:
    """Installed providers in preference order (TensorRT EP, CUDA EP, CPU); CPU always last."""
    available = ort.get_available_providers() if available is None else available
    chosen = [p for p in PROVIDER_PREFERENCE if p in available]
    if CPU_EP not in chosen:
        chosen.append(CPU_EP)
    return chosen


def session_options(providers: list[str], threads: int | None = None) -> ort.SessionOptions:
    """Session options for a part; CPU-specific threading only when CPU does the work."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: the TRT EP warns per unsupported node
    if providers[0] == CPU_EP:
        options.intra_op_num_threads = threads or cpu_count()
        options.inter_op_num_threads = 1  # sequential execution uses no inter-op pool
        # 41 -> 90 ms decoder latency with spinning on (three sessions, few cores); see module doc.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    elif threads:
        options.intra_op_num_threads = threads
    return options


def provider_options(provider: str, engines_dir: Path, spec: PartSpec) -> dict[str, Any]:
    """Per-provider options. The TRT EP gets a batch profile so it builds one engine, not one per shape."""
    if provider != TENSORRT_EP:
        return {}
    from engines.tensorrt_build import profile_shapes  # pure function; tensorrt itself is not imported

    shapes = profile_shapes(spec, spec.max_batch)

    def fmt(index: int) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in dims[index])}" for name, dims in shapes.items())

    options: dict[str, Any] = {
        "trt_fp16_enable": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(Path(engines_dir) / ORT_TRT_CACHE_DIR),
        "trt_timing_cache_enable": True,
        "trt_max_workspace_size": 1 << 30,
    }
    if shapes:
        options.update(
            trt_profile_min_shapes=fmt(0), trt_profile_opt_shapes=fmt(1), trt_profile_max_shapes=fmt(2)
        )
    return options


class OnnxRuntimePart:
    """One ORT session for one part."""

    def __init__(self, session: ort.InferenceSession, spec: PartSpec) -> None:
        self.session = session
        self.spec = spec
        self.max_batch = max(1, spec.max_batch)
        graph_inputs = {i.name for i in session.get_inputs()}
        graph_outputs = {o.name for o in session.get_outputs()}
        if graph_inputs != set(spec.input_names) or not set(spec.output_names) <= graph_outputs:
            raise EngineError(
                f"{spec.name}: graph tensors {sorted(graph_inputs)} -> {sorted(graph_outputs)} do not match "
                f"the manifest {list(spec.input_names)} -> {list(spec.output_names)}"
            )

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # ORT's own limit is memory, not a profile: the manifest's max_batch is only a hint here.
        validate_inputs(self.spec, inputs)
        feed = {name: np.ascontiguousarray(array) for name, array in inputs.items()}
        try:
            outputs = self.session.run(list(self.spec.output_names), feed)
        except Exception as exc:  # ORT raises its own Fail/RuntimeException types
            raise EngineError(f"{self.spec.name}: onnxruntime failed: {exc}") from exc
        return dict(zip(self.spec.output_names, outputs))

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


class OnnxRuntimeBackend:
    """ONNX Runtime over a bundle; ``device`` names the first provider actually in use."""

    kind = "onnxruntime"

    def __init__(
        self,
        bundle: Bundle,
        *,
        threads: int | None = None,
        providers: list[str] | None = None,
        engines_dir: Path | None = None,
    ) -> None:
        self.bundle = bundle
        self.engines_dir = Path(engines_dir) if engines_dir is not None else bundle.engines_dir
        available = ort.get_available_providers()
        if providers:
            absent = [p for p in providers if p not in available]
            if absent:
                raise BackendUnavailable(
                    f"onnxruntime providers {absent} are not installed (have {available})"
                )
            self.providers = list(providers)
        else:
            self.providers = preferred_providers(available)
        self.threads = threads
        self.precision = "fp16" if self.providers[0] == TENSORRT_EP else "fp32"
        self._parts: dict[str, OnnxRuntimePart] = {}

    @property
    def device(self) -> str:
        first = self.providers[0]
        if first == CPU_EP:
            return f"cpu ({self.threads or cpu_count()} threads)"
        return {TENSORRT_EP: "cuda:0 (onnxruntime TensorRT EP)", CUDA_EP: "cuda:0 (onnxruntime CUDA EP)"}.get(
            first, first
        )

    def load(self, part: str) -> OnnxRuntimePart:
        if part in self._parts:
            return self._parts[part]
        spec = self.bundle.part(part)
        path = self.bundle.part_path(part)
        options = session_options(self.providers, self.threads)
        provider_list = [(p, provider_options(p, self.engines_dir, spec)) for p in self.providers]
        if any(p == TENSORRT_EP for p in self.providers):
            (self.engines_dir / ORT_TRT_CACHE_DIR).mkdir(parents=True, exist_ok=True)
        try:
            # From the path, not bytes: ORT resolves external data (graphs > 2 GB) relative to it.
            session = ort.InferenceSession(str(path), sess_options=options, providers=provider_list)
        except Exception as exc:
            raise EngineError(f"{part}: onnxruntime cannot load {path.name}: {exc}") from exc
        runner = OnnxRuntimePart(session, spec)
        self._parts[part] = runner
        return runner

    def memory(self) -> MemoryReport:
        # ORT exposes no allocator statistics in Python; weights bytes on disk approximate the arena.
        parts = {name: _weights_bytes(self.bundle, runner.spec) for name, runner in self._parts.items()}
        return MemoryReport(host_rss_bytes=host_rss_bytes(), parts=parts)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "device": self.device,
            "precision": self.precision,
            "providers": list(self.providers),
            "onnxruntime": ort.__version__,
        }

    def close(self) -> None:
        for runner in self._parts.values():
            runner.close()
        self._parts.clear()


def _weights_bytes(bundle: Bundle, spec: PartSpec) -> int:
    files = [spec.file, *spec.external_data]
    return int(sum(Path(bundle.path(f)).stat().st_size for f in files if bundle.path(f).is_file()))
