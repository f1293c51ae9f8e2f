"""Which backend runs a bundle here, and opening it.

:func:`resolve_backend` is the one place that turns a requested kind (``auto``, ``tensorrt``,
``onnxruntime``) into the backend that will run: ``python -m engines``, the server and the
container entrypoint all ask it, so they cannot disagree. ``auto`` takes the first kind of
:data:`AUTO_ORDER` that can run the bundle and is present on this machine; a bundle marked
``cpu_only`` (the int8 copy from ``python -m export quantize``) is never given to TensorRT,
whose ONNX parser lacks MatMulInteger/DynamicQuantizeLinear. An explicit kind that cannot be
had raises :class:`BackendUnavailable` instead of silently running elsewhere (a benchmark on
the wrong backend is worse than none).

:func:`open_backend` resolves, then builds the backend from :class:`BackendOptions`. Each kind
is one :class:`BackendKind` entry in :data:`KINDS`: adding a backend (a Triton client, say) is
one opener function and one entry, with no change to the protocol in ``engines/backend.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from engines.backend import Backend
from engines.bundle import Bundle, Manifest
from engines.errors import BackendUnavailable


@dataclass(frozen=True)
class BackendOptions:
    """How to open a backend; each kind reads the fields that concern it."""

    precision: str | None = None  # TensorRT plans: fp16 (default) | fp32; ONNX Runtime: fp32 graphs only
    threads: int | None = None  # ONNX Runtime CPU threads (default: every core this process may use)
    providers: tuple[str, ...] | None = None  # ONNX Runtime execution providers (default: best installed)
    build_missing: bool = True  # TensorRT: build absent or stale plans on load instead of failing
    engines_dir: Path | None = None  # plans and caches (default BUNDLE/engines)
    on_build: Callable[[str], None] | None = None  # TensorRT: called with a part's name before its plan is built
    triton: Mapping[str, Any] | None = None  # Triton: engines.triton.TritonBackend keywords (url, prefix, timeouts)


@dataclass(frozen=True)
class BackendKind:
    """One way to run bundles."""

    name: str
    open: Callable[[Bundle, BackendOptions], Backend]
    present: Callable[[], bool]  # whether this machine can run it (what ``auto`` asks)
    precisions: tuple[str, ...]  # what ``precision`` may be; the first is the default
    runs_cpu_only: bool  # accepts bundles marked cpu_only (int8 for ONNX Runtime on a CPU)
    builds_plans: bool = False  # a configured plan precision (SAM3_PRECISION) applies to it


@dataclass(frozen=True)
class BackendChoice:
    """What :func:`resolve_backend` decided, and why (the server and entrypoint log it)."""

    kind: str
    precision: str  # the precision the backend is asked for
    reason: str


def _open_tensorrt(bundle: Bundle, options: BackendOptions) -> Backend:
    from engines.tensorrt import TensorRTBackend

    return TensorRTBackend(
        bundle,
        precision=options.precision or "fp16",
        build_missing=options.build_missing,
        engines_dir=options.engines_dir,
        on_build=options.on_build,
    )


def _open_onnxruntime(bundle: Bundle, options: BackendOptions) -> Backend:
    from engines.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(
        bundle,
        threads=options.threads,
        providers=list(options.providers) if options.providers else None,
        engines_dir=options.engines_dir,
    )


def _open_triton(bundle: Bundle, options: BackendOptions) -> Backend:
    from engines.triton import TritonBackend

    return TritonBackend(bundle, **dict(options.triton or {}))


def _tensorrt_present() -> bool:
    from engines.tensorrt import tensorrt_available

    return tensorrt_available()


KINDS: dict[str, BackendKind] = {
    kind.name: kind
    for kind in (
        BackendKind("tensorrt", _open_tensorrt, _tensorrt_present, ("fp16", "fp32"), runs_cpu_only=False,
                    builds_plans=True),
        BackendKind("onnxruntime", _open_onnxruntime, lambda: True, ("fp32",), runs_cpu_only=True),
        # Remote parts on a Triton server (python -m export triton): never chosen by ``auto``; the
        # precision is the repository's (its plans or graphs), reported by the backend.
        BackendKind("triton", _open_triton, lambda: False, ("fp32", "fp16"), runs_cpu_only=True),
    )
}
# ``auto`` tries these in order; the last must run anywhere (onnxruntime is a hard dependency).
AUTO_ORDER: tuple[str, ...] = ("tensorrt", "onnxruntime")
# What --backend / SAM3_BACKEND and --precision / SAM3_PRECISION may be, wherever they are read
# (python -m engines, the server's settings and CLI, the container entrypoint).
BACKEND_KINDS: tuple[str, ...] = ("auto", *KINDS)
PLAN_PRECISIONS: tuple[str, ...] = tuple(dict.fromkeys(p for k in KINDS.values() if k.builds_plans for p in k.precisions))


def plan_precision(kind: str, precision: str | None) -> str | None:
    """A configured plan precision as a request for ``kind``: kept for kinds that build plans
    (and ``auto``, which drops it by itself where it lands on ONNX Runtime), dropped for those
    that run their graphs as they are (onnxruntime, triton)."""
    if kind == "auto" or (kind in KINDS and KINDS[kind].builds_plans):
        return precision
    return None


def embedding_dtype(precision: str) -> str:
    """The dtype a server caches embeddings in for a backend running at ``precision``: fp16
    halves the bytes where the engines compute in fp16 anyway (decoders cast them back)."""
    return "float16" if precision == "fp16" else "float32"


def is_cpu_only(manifest: Manifest) -> bool:
    """Bundles quantized for ONNX Runtime on a CPU say so in their manifest."""
    return bool(manifest.export.get("quantization", {}).get("cpu_only"))


def resolve_backend(
    manifest: Manifest,
    requested: str = "auto",
    *,
    precision: str | None = None,
    present: Mapping[str, bool] | None = None,
) -> BackendChoice:
    """The backend that runs ``manifest``'s bundle on this machine for ``requested``.

    ``precision`` binds an explicit kind (refused where it cannot be honoured) but not ``auto``'s
    fallback: a TensorRT precision request does not stop ``auto`` from using ONNX Runtime.
    ``present`` overrides the presence probes by kind name; the container entrypoint passes its
    own (it must decide before the server starts, without opening a CUDA context).
    """
    if requested not in BACKEND_KINDS:
        raise BackendUnavailable(f"unknown backend {requested!r}; choose one of {', '.join(BACKEND_KINDS)}")
    cpu_only = is_cpu_only(manifest)

    def is_present(kind: BackendKind) -> bool:
        if present is not None and kind.name in present:
            return bool(present[kind.name])
        return kind.present()

    if requested != "auto":
        kind = KINDS[requested]
        if cpu_only and not kind.runs_cpu_only:
            what = manifest.export["quantization"].get("kind") or "int8"
            raise BackendUnavailable(
                f"this bundle is marked cpu_only ({what}, for ONNX Runtime on a CPU); {kind.name} cannot "
                "run it: build engines from the fp32 bundle it was made from"
            )
        if precision is not None and precision not in kind.precisions:
            raise BackendUnavailable(
                f"{kind.name} runs {' or '.join(kind.precisions)}; precision {precision!r} is not available"
            )
        return BackendChoice(kind.name, precision or kind.precisions[0], f"{kind.name} requested")

    skipped: list[str] = []
    for name in AUTO_ORDER:
        kind = KINDS[name]
        if cpu_only and not kind.runs_cpu_only:
            skipped.append(f"{name} cannot run this cpu_only bundle")
            continue
        if name != AUTO_ORDER[-1] and not is_present(kind):
            skipped.append(f"{name} is not available here")
            continue
        chosen = precision if precision in kind.precisions else kind.precisions[0]
        reason = "auto: " + "; ".join([*skipped, f"{name} chosen"])
        return BackendChoice(name, chosen, reason)
    raise AssertionError("AUTO_ORDER ends with a backend that is always present")  # pragma: no cover


def open_backend(
    bundle: Bundle | str | os.PathLike[str],
    kind: str = "auto",
    *,
    precision: str | None = None,
    threads: int | None = None,
    providers: list[str] | None = None,
    build_missing: bool = True,
    engines_dir: str | os.PathLike[str] | None = None,
    on_build: Callable[[str], None] | None = None,
    triton: Mapping[str, Any] | None = None,
) -> Backend:
    """Resolve ``kind`` for ``bundle`` (:func:`resolve_backend`) and open that backend."""
    if not isinstance(bundle, Bundle):
        bundle = Bundle(bundle)
    choice = resolve_backend(bundle.manifest, kind, precision=precision)
    options = BackendOptions(
        precision=choice.precision,
        threads=threads,
        providers=tuple(providers) if providers else None,
        build_missing=build_missing,
        engines_dir=Path(engines_dir) if engines_dir is not None else None,
        on_build=on_build,
        triton=triton,
    )
    return KINDS[choice.kind].open(bundle, options)
