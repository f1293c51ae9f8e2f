"""TensorRT 10 runtime: plan -> numpy outputs (``execute_async_v3``, one stream, one owning thread).

Plans are made, named and verified by engines/tensorrt_build.py: for each part this module asks
it for the plan's key and path (:func:`~engines.tensorrt_build.key_for`,
:func:`~engines.tensorrt_build.plan_path`), deserialises a plan only when
:func:`~engines.tensorrt_build.is_plan_current` says our builder wrote it for exactly that key,
and otherwise has it built there (:func:`~engines.tensorrt_build.ensure_plan`) or refuses.
TensorRT plans are not portable across GPUs or TensorRT versions ("serialized engines are not
portable across platforms or TensorRT versions", TensorRT Developer Guide, *Serialization*);
the key hashes both, so a plan copied from another device is rebuilt, never loaded.

* **Pure logic** (no TensorRT, no GPU; unit-tested on any machine): :func:`numpy_dtype`.
* **Device code** (:class:`CudaDevice`, :class:`DeviceThread`, :class:`TensorRTPart`,
  :class:`TensorRTBackend`): thin calls into the ``tensorrt`` and CUDA Python APIs, imported
  lazily so ``import engines.tensorrt`` works on a laptop (:func:`tensorrt_available` says
  whether they can run here). Documented as device-only in engines/README.md with the Jetson
  commands. The TensorRT calls are typed: ``tensorrt`` is imported where it is used (no ``Any``
  handle in between), so ``mypy --strict`` with tensorrt-stubs checks every one against
  TensorRT 10's API (scripts/typecheck_tensorrt.py, tests/engines/test_tensorrt_types.py).
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar

import numpy as np

from engines.backend import MemoryReport, host_rss_bytes, validate_inputs
from engines.bundle import BATCH, Bundle, PartSpec
from engines.errors import BackendUnavailable, EngineError
from engines.tensorrt_build import (
    BuildSettings,
    check_tensorrt,
    ensure_plan,
    is_plan_current,
    key_for,
    plan_path,
)

if TYPE_CHECKING:
    # The stubs (tensorrt-stubs): mypy checks every TensorRT call below against TensorRT's API.
    # At run time TensorRT is imported inside the device functions only (absent off-device).
    import tensorrt as trt

T = TypeVar("T")


# trt.DataType member name -> numpy dtype; what trt.nptype answers, as a table we can test off-device
_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "FLOAT": np.dtype(np.float32),
    "HALF": np.dtype(np.float16),
    "INT8": np.dtype(np.int8),
    "UINT8": np.dtype(np.uint8),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
}


def numpy_dtype(datatype_name: str) -> np.dtype[Any]:
    """numpy dtype of a ``trt.DataType`` member name; EngineError for types numpy cannot hold."""
    try:
        return _NUMPY_DTYPES[datatype_name]
    except KeyError:
        raise EngineError(f"TensorRT tensor type {datatype_name} has no numpy equivalent") from None


class CudaDevice:
    """The few CUDA runtime calls we need, over cuda-python (preferred) or pycuda.

    Neither package ships type stubs: their values are ``Any`` here and converted to ``int`` at
    this class's edge, so the TensorRT code that uses it sees typed values only.
    """

    def __init__(self) -> None:
        self._allocations: dict[int, Any] = {}
        self._rt: Any = None
        self._drv: Any = None
        self._stream: Any = None
        self.capability: tuple[int, int] = (0, 0)
        self.name = ""
        try:
            try:
                from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
            except ImportError:
                from cuda import cudart  # older cuda-python layout
            self.flavour = "cuda-python"
            self._rt = cudart
            try:
                count = int(self._check(cudart.cudaGetDeviceCount()))
                if count < 1:
                    raise BackendUnavailable("no CUDA device found")
                self._check(cudart.cudaSetDevice(0))
                self._stream = self._check(cudart.cudaStreamCreate())
                props = self._check(cudart.cudaGetDeviceProperties(0))
            except EngineError as exc:  # no driver / no device: not a bug, just not here
                raise BackendUnavailable(f"CUDA is not usable: {exc}") from exc
            self.capability = (int(props.major), int(props.minor))
            name = props.name
            self.name = name.decode(errors="replace").rstrip("\0") if isinstance(name, bytes) else str(name)
            return
        except ImportError:
            pass
        try:
            import pycuda.driver as drv
        except ImportError as exc:
            raise BackendUnavailable(
                "neither cuda-python nor pycuda is installed (pip install cuda-python)"
            ) from exc
        self.flavour = "pycuda"
        try:
            drv.init()
            if drv.Device.count() < 1:
                raise BackendUnavailable("no CUDA device found")
            device = drv.Device(0)
            # The primary context is what TensorRT itself uses; push it on this (the owning) thread.
            self._context = device.retain_primary_context()
            self._context.push()
        except drv.Error as exc:
            raise BackendUnavailable(f"CUDA is not usable: {exc}") from exc
        self._drv = drv
        self._stream = drv.Stream()
        major, minor = device.compute_capability()
        self.capability = (int(major), int(minor))
        self.name = str(device.name())

    def _check(self, result: Any) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if getattr(err, "value", err) != 0:
            raise EngineError(f"CUDA call failed: {err}")
        return values[0] if len(values) == 1 else tuple(values) if values else None

    @property
    def stream_handle(self) -> int:
        return int(self._stream) if self._rt is not None else int(self._stream.handle)

    def malloc(self, nbytes: int) -> int:
        if self._rt is not None:
            ptr = int(self._check(self._rt.cudaMalloc(max(nbytes, 1))))
            self._allocations[ptr] = nbytes
            return ptr
        allocation = self._drv.mem_alloc(max(nbytes, 1))
        self._allocations[int(allocation)] = allocation
        return int(allocation)

    def free(self, ptr: int) -> None:
        allocation = self._allocations.pop(ptr, None)
        if self._rt is not None:
            self._check(self._rt.cudaFree(ptr))
        elif allocation is not None:
            allocation.free()

    def htod(self, ptr: int, array: np.ndarray) -> None:
        if self._rt is not None:
            kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            self._check(self._rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, self._stream))
        else:
            self._drv.memcpy_htod_async(ptr, array, self._stream)

    def dtoh(self, array: np.ndarray, ptr: int) -> None:
        if self._rt is not None:
            kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._check(self._rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, self._stream))
        else:
            self._drv.memcpy_dtoh_async(array, ptr, self._stream)

    def synchronize(self) -> None:
        if self._rt is not None:
            self._check(self._rt.cudaStreamSynchronize(self._stream))
        else:
            self._stream.synchronize()

    def mem_info(self) -> tuple[int, int]:
        if self._rt is not None:
            free, total = self._check(self._rt.cudaMemGetInfo())
            return int(free), int(total)
        free, total = self._drv.mem_get_info()
        return int(free), int(total)

    @property
    def compute_capability(self) -> str:
        return f"{self.capability[0]}.{self.capability[1]}"


@functools.lru_cache(maxsize=1)
def tensorrt_available() -> bool:
    """TensorRT 10 imports and a CUDA device answers (what ``auto`` asks, engines/factory.py)."""
    try:
        check_tensorrt()
        device = DeviceThread()
        device.close()
        return True
    except Exception:  # noqa: BLE001 - "auto" must fall back to ORT on any driver/runtime failure
        return False


class DeviceThread:
    """One thread owns the CUDA context, the stream and every TensorRT call.

    pycuda contexts are per-thread, and TensorRT execution contexts must not be used from two
    threads at once (TensorRT Developer Guide, *Thread Safety*); funnelling all calls through
    one thread makes both true whatever thread the server calls from.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensorrt")
        try:
            self.cuda: CudaDevice = self.call(CudaDevice)
        except BaseException:
            self._executor.shutdown(wait=False)
            raise

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._executor.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class TensorRTPart:
    """One deserialised engine, its execution context and its device buffers.

    Buffers grow on demand (to the batch actually seen, at most the profile max) instead of
    being sized for max batch up front: the decoder's pred_masks alone is 66 MB per prompt
    at 1008 px, and the Orin Nano's GPU memory is the system's memory.
    """

    def __init__(self, engine: trt.ICudaEngine, spec: PartSpec, device: DeviceThread) -> None:
        import tensorrt as trt

        self.engine: trt.ICudaEngine | None = engine
        self.spec = spec
        self._device = device
        self.context: trt.IExecutionContext | None = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        outputs = set(names) - inputs
        if inputs != set(spec.input_names) or outputs != set(spec.output_names):
            raise EngineError(
                f"{spec.name}: plan tensors {sorted(inputs)} -> {sorted(outputs)} do not match the manifest"
            )
        # What the plan itself holds (the ONNX graph's types), not what the manifest claims.
        self._dtypes = {name: numpy_dtype(engine.get_tensor_dtype(name).name) for name in names}
        self.max_batch = 1
        for tensor in spec.inputs:
            if tensor.has_batch:
                _, _, max_shape = engine.get_tensor_profile_shape(tensor.name, 0)
                self.max_batch = int(max_shape[list(tensor.shape).index(BATCH)])
                break
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device ptr, capacity bytes)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, capacity = self._buffers.get(name, (0, -1))
        if capacity < nbytes:
            if ptr:
                self._device.cuda.free(ptr)
            ptr = self._device.cuda.malloc(nbytes)
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        validate_inputs(self.spec, inputs, self.max_batch)
        return self._device.call(self._run, inputs)

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, context = self._device.cuda, self.context
        if context is None:
            raise EngineError(f"{self.spec.name}: this engine is closed")
        hosts = []  # keep host arrays alive until the stream is synchronised
        for name in self.spec.input_names:
            array = np.ascontiguousarray(inputs[name], dtype=self._dtypes[name])
            hosts.append(array)
            if not context.set_input_shape(name, array.shape):
                raise EngineError(
                    f"{self.spec.name}: shape {list(array.shape)} of {name!r} is outside the profile"
                )
            ptr = self._buffer(name, array.nbytes)
            cuda.htod(ptr, array)
            context.set_tensor_address(name, ptr)
        unresolved = context.infer_shapes()
        if unresolved:
            raise EngineError(f"{self.spec.name}: cannot infer shapes of {unresolved}")
        results: dict[str, np.ndarray] = {}
        for name in self.spec.output_names:
            dims = context.get_tensor_shape(name)
            shape = tuple(int(dims[i]) for i in range(len(dims)))
            host = np.empty(shape, dtype=self._dtypes[name])
            ptr = self._buffer(name, host.nbytes)
            context.set_tensor_address(name, ptr)
            results[name] = host
        if not context.execute_async_v3(cuda.stream_handle):
            raise EngineError(f"{self.spec.name}: TensorRT execution failed")
        for name, host in results.items():
            cuda.dtoh(host, self._buffers[name][0])
        cuda.synchronize()
        del hosts
        return {name: host.astype(self.spec.output(name).dtype, copy=False) for name, host in results.items()}

    @property
    def device_bytes(self) -> int:
        if self.engine is None:
            return 0
        engine = self.engine
        # _v2 counts weight-streaming scratch too; older TensorRT 10 releases have only the first.
        if hasattr(engine, "device_memory_size_v2"):
            engine_bytes = engine.device_memory_size_v2
        else:
            engine_bytes = engine.device_memory_size
        return int(engine_bytes) + sum(capacity for _, capacity in self._buffers.values())

    def close(self) -> None:
        def release() -> None:
            for ptr, _ in self._buffers.values():
                self._device.cuda.free(ptr)
            self._buffers.clear()
            self.context = None
            self.engine = None

        self._device.call(release)


class TensorRTBackend:
    """Plans from ``BUNDLE/engines`` (built on first load when missing or stale)."""

    kind = "tensorrt"

    def __init__(
        self,
        bundle: Bundle,
        *,
        precision: str = "fp16",
        build_missing: bool = True,
        settings: BuildSettings | None = None,
        engines_dir: Path | None = None,
        on_build: Callable[[str], None] | None = None,
    ) -> None:
        self.version = check_tensorrt()
        import tensorrt as trt

        self.bundle = bundle
        self.engines_dir = Path(engines_dir) if engines_dir is not None else bundle.engines_dir
        self.settings = settings or BuildSettings(precision=precision)
        self.precision = self.settings.precision
        self.build_missing = build_missing
        self._on_build = on_build
        self._device = DeviceThread()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime: trt.Runtime = self._device.call(trt.Runtime, self._logger)
        self._parts: dict[str, TensorRTPart] = {}
        self._lock = threading.Lock()

    @property
    def device(self) -> str:
        cuda = self._device.cuda
        return f"cuda:0 {cuda.name} (sm_{cuda.capability[0]}{cuda.capability[1]})"

    def load(self, part: str) -> TensorRTPart:
        with self._lock:
            if part not in self._parts:
                self._parts[part] = self._device.call(self._load, part)
            return self._parts[part]

    def _load(self, part: str) -> TensorRTPart:
        spec = self.bundle.part(part)
        key = key_for(spec, self.settings, self.version, self._device.cuda.compute_capability)
        plan = plan_path(self.engines_dir, part, key)
        if not is_plan_current(plan, key):
            if not self.build_missing:
                raise EngineError(
                    f"{part}: no current TensorRT plan ({plan.name}); "
                    f"run `python -m engines build {self.bundle.root}`"
                )
            if self._on_build is not None:
                self._on_build(part)
            plan = ensure_plan(
                self.bundle, part, self.settings, self._device.cuda, engines_dir=self.engines_dir
            ).plan
        engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise EngineError(f"{part}: TensorRT could not deserialise {plan.name}")
        return TensorRTPart(engine, spec, self._device)

    def memory(self) -> MemoryReport:
        free, total = self._device.call(self._device.cuda.mem_info)
        parts = {name: runner.device_bytes for name, runner in self._parts.items()}
        return MemoryReport(
            host_rss_bytes(), device_used_bytes=total - free, device_total_bytes=total, parts=parts
        )

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "device": self.device,
            "precision": self.precision,
            "tensorrt": self.version,
            "cuda": self._device.cuda.flavour,
            "plans": self._plan_names(),
        }

    def _plan_names(self) -> dict[str, str]:
        cc = self._device.cuda.compute_capability
        return {
            name: plan_path(
                self.engines_dir, name, key_for(self.bundle.part(name), self.settings, self.version, cc)
            ).name
            for name in self._parts
        }

    def close(self) -> None:
        for runner in self._parts.values():
            runner.close()
        self._parts.clear()
        self._device.close()
