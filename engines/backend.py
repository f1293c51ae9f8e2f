"""Backend protocol: load one part of a bundle, run it on numpy arrays, report where it runs.

The pipeline never knows whether TensorRT or ONNX Runtime is underneath: both load a
:class:`~engines.bundle.PartSpec` and expose ``run(inputs) -> outputs`` keyed by the
manifest's tensor names. Which one runs is decided in ``engines/factory.py``; this module
imports no backend, so every backend can import it.

Inputs are checked against the PartSpec *before* they reach an engine: TensorRT given a
wrong dtype reads the bytes as the engine's type and returns garbage without complaint, and
ORT's message names the graph's internal node, not what the caller sent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np

from engines.bundle import BATCH, PartSpec
from engines.errors import EngineError


@dataclass(frozen=True)
class MemoryReport:
    """Bytes held by a backend; ``None`` where the platform cannot tell."""

    host_rss_bytes: int | None
    device_used_bytes: int | None = None  # whole device (on a Jetson: shared with the CPU)
    device_total_bytes: int | None = None
    parts: dict[str, int] = field(default_factory=dict)  # engine/session bytes we allocated per part

    def to_json(self) -> dict[str, Any]:
        return {
            "host_rss_bytes": self.host_rss_bytes,
            "device_used_bytes": self.device_used_bytes,
            "device_total_bytes": self.device_total_bytes,
            "parts": dict(self.parts),
        }


@runtime_checkable
class PartRunner(Protocol):
    """One loaded graph. ``run`` is called from one thread at a time (the pipeline's worker)."""

    spec: PartSpec
    max_batch: int  # the largest batch this runner accepts (TensorRT: the profile max)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """A way to execute bundle parts."""

    kind: str  # a name in engines.factory.KINDS: "onnxruntime" | "tensorrt" | "triton"
    device: str  # human-readable: "cpu (8 threads)", "cuda:0 Orin (sm_87)"
    precision: str  # "fp32" | "fp16"

    def load(self, part: str) -> PartRunner: ...

    def memory(self) -> MemoryReport: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def validate_inputs(spec: PartSpec, inputs: Mapping[str, np.ndarray], max_batch: int | None = None) -> int:
    """Check names, dtypes and shapes against the manifest; return the batch size.

    Raises :class:`EngineError` naming the offending tensor. Dtypes must match exactly: a
    silent cast would hide a contract drift between exporter and runtime (the pipeline casts
    on purpose where it means to, e.g. an fp16-cached embedding).
    """
    expected = set(spec.input_names)
    given = set(inputs)
    if given != expected:
        missing = sorted(expected - given)
        extra = sorted(given - expected)
        raise EngineError(
            f"{spec.name}: inputs do not match the manifest (missing {missing}, unexpected {extra})"
        )
    batch: int | None = None
    for tspec in spec.inputs:
        array = inputs[tspec.name]
        if not isinstance(array, np.ndarray):
            raise EngineError(
                f"{spec.name}: input {tspec.name!r} is {type(array).__name__}, expected numpy.ndarray"
            )
        if array.dtype != np.dtype(tspec.dtype):
            raise EngineError(
                f"{spec.name}: input {tspec.name!r} has dtype {array.dtype}, expected {tspec.dtype}"
            )
        if array.ndim != len(tspec.shape):
            raise EngineError(
                f"{spec.name}: input {tspec.name!r} has shape {list(array.shape)}, "
                f"expected rank {len(tspec.shape)} {list(tspec.shape)}"
            )
        for axis, (dim, want) in enumerate(zip(array.shape, tspec.shape)):
            if want == BATCH:
                if batch is None:
                    batch = int(dim)
                elif dim != batch:
                    raise EngineError(
                        f"{spec.name}: input {tspec.name!r} has batch {dim}, other inputs have batch {batch}"
                    )
            elif dim != int(want):
                raise EngineError(
                    f"{spec.name}: input {tspec.name!r} has shape {list(array.shape)}, "
                    f"expected {list(tspec.shape)} (axis {axis})"
                )
    batch = 1 if batch is None else batch
    if batch < 1:
        raise EngineError(f"{spec.name}: batch must be at least 1, got {batch}")
    if max_batch is not None and batch > max_batch:
        raise EngineError(f"{spec.name}: batch {batch} exceeds this engine's max batch {max_batch}")
    return batch


def host_rss_bytes() -> int | None:
    """Resident set size from /proc (Linux/Jetson); no psutil dependency on the device."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_count() -> int:
    """Cores this process may use (cgroup/affinity aware, unlike os.cpu_count in containers)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
