"""TensorRT 10 plan builder (ONNX -> plan) and every decision about plans.

This module owns what a plan is called, the key it carries and whether a cached one may be
loaded: engines/tensorrt.py (the runtime) asks it (:func:`key_for`, :func:`plan_path`,
:func:`is_plan_current`, :func:`ensure_plan`) and never names or checks a plan itself. Two halves,
kept apart on purpose:

* **Pure logic** (no TensorRT, no GPU; unit-tested on any machine): :class:`BuildSettings`,
  :func:`profile_shapes`, :func:`engine_key`, :func:`plan_path`, :func:`is_plan_current`,
  :func:`stale_plans`, :func:`fp32_pinned_layers`, :func:`precision_summary`,
  :func:`tolerance_report`. Every decision the builder makes is taken here.
* **Device code** (:func:`ensure_plan`, :func:`build_plan`): thin calls into the ``tensorrt``
  Python API, imported lazily (:func:`check_tensorrt` says why it cannot be had) so
  ``import engines.tensorrt_build`` works on a laptop. They run on the thread that owns the
  CUDA context (``engines.tensorrt.DeviceThread``) and need of the GPU only what a
  :class:`BuildDevice` offers. Documented as device-only in engines/README.md with the Jetson
  commands. The TensorRT calls are typed: ``tensorrt`` is imported where it is used (no ``Any``
  handle in between), so ``mypy --strict`` with tensorrt-stubs checks every one against
  TensorRT 10's API (scripts/typecheck_tensorrt.py, tests/engines/test_tensorrt_types.py).

Plans are cached under ``BUNDLE/engines/<part>.<key>.plan``. TensorRT plans are specific to
the TensorRT version and the GPU they were built on ("serialized engines are not portable
across platforms or TensorRT versions", TensorRT Developer Guide, *Serialization*), so the
key hashes both, plus the ONNX hash, precision, profile and FP32 pins. A plan is loaded only
if its JSON build log beside it records the same key and the plan's sha256: a plan copied
from another device, truncated by a crash or built from older settings is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Protocol, Sequence

import numpy as np

from engines.bundle import EXEMPLAR_PART_NAMES, PART_NAMES, Bundle, PartSpec, sha256_file, write_atomic
from engines.errors import BackendUnavailable, EngineError

if TYPE_CHECKING:
    # The stubs (tensorrt-stubs): mypy checks every TensorRT call below against TensorRT's API.
    # At run time TensorRT is imported inside the device functions only (absent off-device).
    import tensorrt as trt

PRECISIONS = ("fp16", "fp32")
# Sized for the 8 GB Orin Nano (CPU and GPU share it): 1 GiB of tactic scratch lets the
# builder pick the fast attention/GEMM kernels without starving the rest of the system.
DEFAULT_WORKSPACE_MB = 1024
KEY_LENGTH = 16  # hex chars of the sha256: 64 bits, plenty to tell plans apart
TIMING_CACHE_FILE = "timing.cache"
PLAN_SUFFIX = ".plan"
LOG_SUFFIX = ".build.json"

# Layer types always kept in FP32 in an FP16 build. TensorRT's own builder warning explains
# the normalisations: "Running layernorm after self-attention in FP16 may cause overflow ...
# forcing layernorm layers to run in FP32 precision can help with preserving accuracy."
# Softmax and reductions (the decomposed LayerNorm's ReduceMean, attention's max/sum) lose
# the same way: a sum of many fp16 terms overflows at 65504.
FP32_LAYER_TYPES = frozenset({"NORMALIZATION", "SOFTMAX", "REDUCE"})
_FLOAT_TYPES = frozenset({"FLOAT", "HALF", "BF16"})
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")


# ----------------------------------------------------------------------------------------
# Pure logic
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildSettings:
    """What the user chooses for a build; everything else comes from the manifest."""

    precision: str = "fp16"
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    max_batch: int | None = None  # None: each part's PartSpec.max_batch
    builder_optimization_level: int = 3  # TensorRT's default; higher levels search longer for faster tactics
    use_timing_cache: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise EngineError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.workspace_mb < 16:
            raise EngineError(f"workspace must be at least 16 MiB, got {self.workspace_mb}")
        if self.max_batch is not None and self.max_batch < 1:
            raise EngineError(f"max batch must be at least 1, got {self.max_batch}")
        if not 0 <= self.builder_optimization_level <= 5:
            raise EngineError(f"builder optimisation level is 0..5, got {self.builder_optimization_level}")

    @property
    def workspace_bytes(self) -> int:
        return self.workspace_mb * (1 << 20)

    def max_batch_for(self, spec: PartSpec) -> int:
        """The profile max: the flag, else the manifest's; 1 for a part with no batch axis."""
        if not any(t.has_batch for t in spec.inputs):
            return 1
        return self.max_batch if self.max_batch is not None else max(1, spec.max_batch)

    @property
    def builder_flags(self) -> tuple[str, ...]:
        """``trt.BuilderFlag`` member names this build sets."""
        return ("FP16", "OBEY_PRECISION_CONSTRAINTS") if self.precision == "fp16" else ()

    def builder_config(self, spec: PartSpec) -> dict[str, Any]:
        """The IBuilderConfig this build will create, as data (logged, and unit-tested)."""
        flags = list(self.builder_flags)
        shapes = profile_shapes(spec, self.max_batch_for(spec))
        return {
            "flags": flags,
            "memory_pool_limits": {"WORKSPACE": self.workspace_bytes},
            "builder_optimization_level": self.builder_optimization_level,
            "profiling_verbosity": "DETAILED",  # the engine inspector needs it for per-layer precision
            "optimization_profiles": [
                {
                    name: {"min": list(mn), "opt": list(op), "max": list(mx)}
                    for name, (mn, op, mx) in shapes.items()
                }
            ]
            if shapes
            else [],
            "timing_cache": self.use_timing_cache,
        }


Shape = tuple[int, ...]


def profile_shapes(spec: PartSpec, max_batch: int) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) per input with a batch axis: batch 1, 1, ``max_batch``.

    opt = 1 because the common call is one image / one prompt; TensorRT tunes tactics for
    opt and only guarantees correctness up to max. Fixed-shape inputs (the decoder's image
    features, batch fixed to 1) need no profile entry.
    """
    if max_batch < 1:
        raise EngineError(f"max batch must be at least 1, got {max_batch}")
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {}
    for tensor in spec.inputs:
        if tensor.has_batch:
            shapes[tensor.name] = (
                tensor.concrete_shape(1),
                tensor.concrete_shape(1),
                tensor.concrete_shape(max_batch),
            )
    return shapes


def engine_key(
    onnx_sha256: str,
    tensorrt_version: str,
    compute_capability: str,
    precision: str,
    profile: Mapping[str, tuple[Shape, Shape, Shape]],
    fp32_layers: Sequence[str] = (),
) -> str:
    """Short hex key naming a plan: any change in what the plan depends on changes it."""
    payload = {
        "onnx_sha256": onnx_sha256,
        "tensorrt": tensorrt_version,
        "compute_capability": compute_capability,
        "precision": precision,
        "profile": {name: [list(s) for s in shapes] for name, shapes in sorted(profile.items())},
        "fp32_layers": sorted(fp32_layers) if precision == "fp16" else [],
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:KEY_LENGTH]


def key_for(spec: PartSpec, settings: BuildSettings, tensorrt_version: str, compute_capability: str) -> str:
    return engine_key(
        spec.sha256,
        tensorrt_version,
        compute_capability,
        settings.precision,
        profile_shapes(spec, settings.max_batch_for(spec)),
        spec.fp32_layers,
    )


def plan_path(engines_dir: Path, part: str, key: str) -> Path:
    if part not in PART_NAMES + EXEMPLAR_PART_NAMES:
        raise EngineError(f"unknown part {part!r}")
    if not re.fullmatch(r"[0-9a-f]{%d}" % KEY_LENGTH, key):
        raise EngineError(f"malformed engine key {key!r}")
    return Path(engines_dir) / f"{part}.{key}{PLAN_SUFFIX}"


def build_log_path(plan: Path) -> Path:
    return plan.with_name(plan.name[: -len(PLAN_SUFFIX)] + LOG_SUFFIX)


def is_plan_current(plan: Path, key: str, *, verify_hash: bool = True) -> bool:
    """True only for a complete plan our builder wrote for exactly this key.

    The file name alone is not trusted: a plan copied in from another machine, or a log
    from an interrupted build, must not be deserialised (TensorRT would reject it at best,
    run the wrong graph at worst).
    """
    plan = Path(plan)
    log = build_log_path(plan)
    if not plan.is_file() or not log.is_file():
        return False
    try:
        record = json.loads(log.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(record, dict) or record.get("key") != key or record.get("plan") != plan.name:
        return False
    if record.get("plan_bytes") != plan.stat().st_size:
        return False
    return not verify_hash or record.get("plan_sha256") == sha256_file(plan)


def stale_plans(engines_dir: Path, part: str, keep_key: str) -> list[Path]:
    """Other plans (and their logs) of ``part``: superseded builds to delete (Jetson disks are small)."""
    engines_dir = Path(engines_dir)
    if not engines_dir.is_dir():
        return []
    keep = {
        plan_path(engines_dir, part, keep_key).name,
        build_log_path(plan_path(engines_dir, part, keep_key)).name,
    }
    pattern = re.compile(rf"{re.escape(part)}\.[0-9a-f]+({re.escape(PLAN_SUFFIX)}|{re.escape(LOG_SUFFIX)})")
    return sorted(p for p in engines_dir.iterdir() if pattern.fullmatch(p.name) and p.name not in keep)


@dataclass(frozen=True)
class LayerInfo:
    """What the pin decision needs from an ``ILayer``: name, ``LayerType`` name, output dtypes.

    ``metadata`` is TensorRT 10's per-layer string ``[ONNX Layer: <node>]``: the parser splits
    one ONNX node into several layers with generated names, but all carry the node's name there.
    """

    name: str
    type: str  # trt.LayerType member name: "SOFTMAX", "NORMALIZATION", ...
    output_dtypes: tuple[str, ...] = ("FLOAT",)  # trt.DataType member names
    metadata: str = ""

    @property
    def onnx_nodes(self) -> tuple[str, ...]:
        return tuple(_ONNX_LAYER.findall(self.metadata))


@dataclass(frozen=True)
class PinPlan:
    pinned: tuple[str, ...]  # layer names to set to FP32 (precision and output types)
    by_type: int  # how many of them were pinned for their type
    unmatched: tuple[str, ...]  # manifest names no layer carries (logged: a renamed node?)


def fp32_pinned_layers(
    layers: Iterable[LayerInfo | tuple[str, str] | tuple[str, str, Sequence[str]]],
    manifest_layers: Sequence[str],
    types: frozenset[str] = FP32_LAYER_TYPES,
) -> PinPlan:
    """Which network layers an FP16 build keeps in FP32.

    A layer is pinned when its type is in ``types`` or its name / ONNX node is in the
    manifest's ``fp32_layers``. Layers with non-float outputs (shape arithmetic, int
    reductions) are never pinned: TensorRT rejects an FP32 output type on an INT32 tensor.
    """
    wanted = set(manifest_layers)
    seen: set[str] = set()
    pinned: list[str] = []
    by_type = 0
    for raw in layers:
        layer = raw if isinstance(raw, LayerInfo) else LayerInfo(*raw)
        names = {layer.name, *layer.onnx_nodes}
        hit = names & wanted
        seen |= hit
        if not set(layer.output_dtypes) <= _FLOAT_TYPES:
            continue
        if layer.type in types:
            pinned.append(layer.name)
            by_type += 1
        elif hit:
            pinned.append(layer.name)
    unmatched = tuple(sorted(wanted - seen))
    return PinPlan(pinned=tuple(pinned), by_type=by_type, unmatched=unmatched)


def _precision_of(datatype: str) -> str:
    text = datatype.lower()
    for needle, label in (
        ("half", "fp16"),
        ("fp16", "fp16"),
        ("bf16", "bf16"),
        ("float", "fp32"),
        ("fp32", "fp32"),
        ("int8", "int8"),
        ("int32", "int32"),
        ("int64", "int64"),
        ("bool", "bool"),
    ):
        if needle in text:
            return label
    return "other"


def precision_summary(engine_information: Mapping[str, Any]) -> dict[str, Any]:
    """Per-precision layer counts from the engine inspector's JSON (``LayerInformationFormat.JSON``).

    A layer counts under the datatype of its first output ("Format/Datatype" reads e.g.
    "Half" or "Row major linear FP32" depending on the TensorRT release). Needs
    ``ProfilingVerbosity.DETAILED``; with less the inspector lists names only, reported as "unknown".
    """
    counts: dict[str, int] = {}
    fp32_layers: list[str] = []
    for entry in engine_information.get("Layers", []):
        if not isinstance(entry, Mapping):  # LAYER_NAMES_ONLY verbosity: a list of strings
            counts["unknown"] = counts.get("unknown", 0) + 1
            continue
        outputs = entry.get("Outputs") or []
        label = _precision_of(str(outputs[0].get("Format/Datatype", ""))) if outputs else "none"
        counts[label] = counts.get(label, 0) + 1
        if label == "fp32":
            fp32_layers.append(str(entry.get("Name", "")))
    return {
        "layers": sum(counts.values()),
        "by_precision": dict(sorted(counts.items())),
        "fp32_layers": fp32_layers,
    }


def tolerance_report(
    reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], *, atol: float, rtol: float
) -> dict[str, Any]:
    """Polygraphy-style comparison: pass iff ``|c - r| <= atol + rtol * |r|`` everywhere."""
    tensors: dict[str, Any] = {}
    for name, ref in reference.items():
        if name not in candidate:
            tensors[name] = {"passed": False, "error": "missing from candidate"}
            continue
        got = np.asarray(candidate[name], dtype=np.float64)
        want = np.asarray(ref, dtype=np.float64)
        if got.shape != want.shape:
            tensors[name] = {"passed": False, "error": f"shape {list(got.shape)} != {list(want.shape)}"}
            continue
        diff = np.abs(got - want)
        finite = bool(np.isfinite(got).all())
        bound = atol + rtol * np.abs(want)
        tensors[name] = {
            "passed": finite and bool((diff <= bound).all()),
            "finite": finite,
            "max_abs": float(diff.max()) if diff.size else 0.0,
            "mean_abs": float(diff.mean()) if diff.size else 0.0,
            "max_rel": float((diff / np.maximum(np.abs(want), 1e-12)).max()) if diff.size else 0.0,
            "violations": int((diff > bound).sum()),
            "elements": int(diff.size),
        }
    return {
        "atol": atol,
        "rtol": rtol,
        "passed": all(t["passed"] for t in tensors.values()),
        "tensors": tensors,
    }


# ----------------------------------------------------------------------------------------
# Device code: needs the tensorrt module and a CUDA device
# ----------------------------------------------------------------------------------------


class BuildDevice(Protocol):
    """What a build needs to know of its GPU: the key hashes the compute capability, the build
    log records the name. ``engines.tensorrt.CudaDevice`` is one."""

    @property
    def name(self) -> str: ...

    @property
    def compute_capability(self) -> str: ...


def tensorrt_installed() -> bool:
    """Cheap: an installed TensorRT Python package (no import, no GPU probe).

    A directory holding only type stubs (``tensorrt-stubs`` installs ``tensorrt/__init__.pyi``)
    imports as an empty namespace package; it is not TensorRT, so it does not count.
    """
    spec = importlib.util.find_spec("tensorrt")
    return spec is not None and spec.origin is not None


def check_tensorrt() -> str:
    """TensorRT's version if TensorRT 10 imports here, else :class:`BackendUnavailable` saying why."""
    try:
        import tensorrt as trt  # noqa: PLC0415 - lazy on purpose: absent off-device
    except ImportError as exc:
        raise BackendUnavailable(
            "TensorRT is not installed here (import tensorrt failed); plans are built on the Jetson "
            "(JetPack 6 ships TensorRT 10): see engines/README.md"
        ) from exc
    if getattr(trt, "__file__", None) is None:
        raise BackendUnavailable(
            "TensorRT is not installed here (only its type stubs are); plans are built on the Jetson "
            "(JetPack 6 ships TensorRT 10): see engines/README.md"
        )
    version = str(trt.__version__)
    if int(version.split(".")[0]) < 10:
        raise BackendUnavailable(f"TensorRT {version} found; this runtime needs TensorRT 10 (execute_async_v3)")
    return version


@dataclass
class BuildResult:
    part: str
    plan: Path
    key: str
    built: bool  # False: a current plan was reused
    seconds: float = 0.0
    log: dict[str, Any] = field(default_factory=dict)


def _layer_infos(network: trt.INetworkDefinition) -> list[LayerInfo]:
    infos = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        dtypes = tuple(layer.get_output(j).dtype.name for j in range(layer.num_outputs))
        infos.append(LayerInfo(layer.name, layer.type.name, dtypes, layer.metadata or ""))
    return infos


def ensure_plan(
    bundle: Bundle,
    part: str,
    settings: BuildSettings,
    cuda: BuildDevice,
    *,
    force: bool = False,
    engines_dir: Path | None = None,
) -> BuildResult:
    """Reuse the current plan for ``part`` or build it (then delete superseded plans).

    ``engines_dir`` defaults to ``BUNDLE/engines``; the container points it at a writable
    volume because the bundle itself is mounted read-only.
    """
    version = check_tensorrt()
    spec = bundle.part(part)
    engines_dir = Path(engines_dir) if engines_dir is not None else bundle.engines_dir
    key = key_for(spec, settings, version, cuda.compute_capability)
    plan = plan_path(engines_dir, part, key)
    if not force and is_plan_current(plan, key):
        return BuildResult(part, plan, key, built=False, log=json.loads(build_log_path(plan).read_text()))
    result = build_plan(bundle, part, settings, cuda, key=key, engines_dir=engines_dir)
    for old in stale_plans(engines_dir, part, key):
        old.unlink(missing_ok=True)
    return result


def build_plan(
    bundle: Bundle, part: str, settings: BuildSettings, cuda: BuildDevice, *, key: str, engines_dir: Path
) -> BuildResult:
    """Build one plan with TensorRT's ONNX parser and write it + its build log atomically."""
    version = check_tensorrt()
    import tensorrt as trt

    spec = bundle.part(part)
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    # parse_from_file, not parse(bytes): it resolves external-data files next to the graph.
    if not parser.parse_from_file(str(bundle.part_path(part))):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{part}: TensorRT cannot parse {spec.file}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.builder_optimization_level = settings.builder_optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    described = settings.builder_config(spec)
    for flag in settings.builder_flags:
        config.set_flag(trt.BuilderFlag.__members__[flag])

    pins = PinPlan((), 0, ())
    if settings.precision == "fp16":
        pins = fp32_pinned_layers(_layer_infos(network), spec.fp32_layers)
        pinned = set(pins.pinned)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.name in pinned:
                # Both: precision picks the kernel, output type stops a reformat back to fp16
                # (OBEY_PRECISION_CONSTRAINTS makes TensorRT fail instead of ignoring them).
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)

    shapes = profile_shapes(spec, settings.max_batch_for(spec))
    if shapes:  # the same profile builder_config() describes in the build log
        profile = builder.create_optimization_profile()
        for name, (smallest, optimal, largest) in shapes.items():
            profile.set_shape(name, trt.Dims(list(smallest)), trt.Dims(list(optimal)), trt.Dims(list(largest)))
        config.add_optimization_profile(profile)

    cache_file = engines_dir / TIMING_CACHE_FILE
    if settings.use_timing_cache:
        blob = cache_file.read_bytes() if cache_file.is_file() else b""
        cache = config.create_timing_cache(blob)
        # A cache from another device/version is refused (ignore_mismatch=False); start afresh.
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{part}: TensorRT build failed (see the builder messages above)")
    plan_bytes = bytes(serialized)
    plan = plan_path(engines_dir, part, key)
    write_atomic(plan, plan_bytes)
    if settings.use_timing_cache:
        write_atomic(cache_file, bytes(config.get_timing_cache().serialize()))
    # Free the builder's copy of the weights before deserialising for the inspector: on the
    # 8 GB Orin Nano the image encoder's network + engine would otherwise coexist.
    del serialized, parser, network, config, builder

    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan_bytes)
    inspector = engine.create_engine_inspector()
    information = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    del inspector, engine, runtime
    seconds = time.perf_counter() - started
    log = {
        "part": part,
        "key": key,
        "plan": plan.name,
        "plan_bytes": len(plan_bytes),
        "plan_sha256": hashlib.sha256(plan_bytes).hexdigest(),
        "key_inputs": {
            "onnx_sha256": spec.sha256,
            "tensorrt": version,
            "compute_capability": cuda.compute_capability,
            "precision": settings.precision,
        },
        "device": cuda.name,
        "settings": dataclasses.asdict(settings),
        "builder_config": described,
        "fp32_pins": {
            "manifest": list(spec.fp32_layers),
            "pinned_layers": len(pins.pinned),
            "pinned_by_type": pins.by_type,
            "unmatched_manifest_names": list(pins.unmatched),
        },
        "precision_summary": precision_summary(information),
        "build_seconds": round(seconds, 2),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_atomic(build_log_path(plan), (json.dumps(log, indent=2) + "\n").encode())
    return BuildResult(part, plan, key, built=True, seconds=seconds, log=log)
