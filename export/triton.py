"""``python -m export triton BUNDLE OUT``: a Triton Inference Server model repository from a bundle.

```
OUT/
  .sam3-repository.json            what was exported from which bundle (this tool's marker)
  sam3_image_encoder/config.pbtxt  1/model.plan | 1/model.onnx | 1/model.py + model.onnx
  sam3_text_encoder/...            dynamic batching across requests
  sam3_decoder/...                 max_batch_size 0: one image broadcast over the prompt batch
  sam3/config.pbtxt                the whole request for plain Triton clients (Python backend):
  sam3/1/model.py, sam3_tensors.py, engines/ (a copy), bundle/manifest.json + tokenizer.json
```

Platforms (``--platform``):

- ``tensorrt`` (``tensorrt_plan``): the plans ``python -m engines build`` made, with their FP32
  pins and precision. A plan runs only on the TensorRT version and GPU it was built with, so
  build on a machine with the Triton release's TensorRT (docs/triton.md).
- ``onnxruntime`` (``onnxruntime_onnx``): the bundle's fp32 ONNX graphs as they are.
- ``python``: the ONNX graphs run by ONNX Runtime inside Triton's Python backend, for Triton
  builds without the onnxruntime backend (PyTriton's wheel, which the tests run) and CPUs.

Every config.pbtxt is generated from the manifest (names, dtypes, dims, batch) and checked
against Triton's model-config protobuf schema (``tritonclient``'s ``model_config_pb2``) before
anything is written; the repository is written beside OUT and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from engines.bundle import PART_NAMES, Bundle, PartSpec, commit_directory, staging_directory, write_atomic
from engines.errors import BundleError
from engines.options import DEFAULT_MAX_MEGAPIXELS, DEFAULT_MAX_PROMPT_CHARS, DEFAULT_MAX_PROMPTS
from engines.triton import (
    CONFIG_DTYPES,
    DEFAULT_PREFIX,
    PARAM_BUNDLE,
    PARAM_MAX_BATCH,
    PARAM_PART,
    PARAM_PRECISION,
    PARAM_SHA256,
    PARAM_WEIGHTS,
    config_dims,
    model_name,
    request_model_name,
    triton_batching,
)

REPO = Path(__file__).resolve().parents[1]
MODELS_SRC = REPO / "deploy" / "triton" / "models"
ENGINES_SRC = REPO / "engines"
MARKER = ".sam3-repository.json"
PLATFORMS = {"tensorrt": "tensorrt_plan", "onnxruntime": "onnxruntime_onnx", "python": "python"}
# Long enough for a second client's request to join the batch, short against an encoder call
# (text encoder ~3 ms, image encoder 50+ ms on an Orin).
DEFAULT_QUEUE_DELAY_US = 2000


class Enum(str):
    """A protobuf enum value: written bare (TYPE_FP32), not quoted."""


@dataclass(frozen=True)
class RepositoryOptions:
    platform: str = "tensorrt"
    prefix: str = DEFAULT_PREFIX
    precision: str = "fp16"  # tensorrt: which plans; the others run the fp32 graphs
    engines_dir: Path | None = None  # tensorrt: where the plans are (default BUNDLE/engines)
    instances: int = 1  # per part model
    request_instances: int = 2  # whole-request model (CPU: preprocessing, postprocessing)
    kind: str | None = None  # KIND_GPU | KIND_CPU; default GPU for tensorrt/onnxruntime, CPU for python
    max_batch: int | None = None  # onnxruntime/python: batch limit of the batched parts
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    request_model: bool = True
    # The whole-request model's limits: the server's defaults (engines.options, server/settings.py).
    limits: Mapping[str, Any] = field(default_factory=lambda: {
        "max_megapixels": DEFAULT_MAX_MEGAPIXELS, "max_prompts": DEFAULT_MAX_PROMPTS,
        "max_prompt_chars": DEFAULT_MAX_PROMPT_CHARS, "max_detections": 100, "embedding_cache_entries": 4,
    })

    def __post_init__(self) -> None:
        if self.platform not in PLATFORMS:
            raise BundleError(f"platform must be one of {', '.join(PLATFORMS)}, got {self.platform!r}")
        if self.precision not in ("fp16", "fp32"):
            raise BundleError(f"precision must be fp16 or fp32, got {self.precision!r}")
        if not self.prefix.replace("_", "").replace("-", "").isalnum():
            raise BundleError(f"model prefix {self.prefix!r}: letters, digits, '_' and '-' only")
        if self.instances < 1 or self.request_instances < 1:
            raise BundleError("instance counts must be at least 1")
        if self.max_batch is not None and (self.max_batch < 1 or self.platform == "tensorrt"):
            raise BundleError("--max-batch >= 1 applies to onnxruntime/python; TensorRT plans fix it when built")
        if self.kind not in (None, "KIND_GPU", "KIND_CPU"):
            raise BundleError(f"instance kind must be KIND_GPU or KIND_CPU, got {self.kind!r}")

    @property
    def instance_kind(self) -> str:
        return self.kind or ("KIND_CPU" if self.platform == "python" else "KIND_GPU")

    @property
    def graph_precision(self) -> str:
        return self.precision if self.platform == "tensorrt" else "fp32"


# --------------------------------------------------------------------------- pbtxt


def to_pbtxt(message: Mapping[str, Any], indent: int = 0) -> str:
    """Protobuf text format of a dict: dicts are messages, lists of dicts repeated messages,
    :class:`Enum` bare identifiers; ``parameters`` (a map) one block per entry."""
    pad = "  " * indent
    lines: list[str] = []
    for key, value in message.items():
        if value is None:
            continue
        if key == "parameters" and isinstance(value, Mapping):
            for name, text in value.items():
                lines.append(f'{pad}parameters {{ key: {_scalar(str(name))} value {{ string_value: {_scalar(str(text))} }} }}')
        elif isinstance(value, Mapping):
            lines.append(f"{pad}{key} {{\n{to_pbtxt(value, indent + 1)}{pad}}}")
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
            blocks = [f"{pad}  {{\n{to_pbtxt(v, indent + 2)}{pad}  }}" for v in value]
            lines.append(f"{pad}{key} [\n" + ",\n".join(blocks) + f"\n{pad}]")
        elif isinstance(value, (list, tuple)):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "".join(line + "\n" for line in lines)


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a quoted string with escapes that protobuf text format reads


def validate_pbtxt(text: str, *, required: bool = False) -> Any:
    """Parse ``text`` into Triton's ``ModelConfig`` message (its protobuf schema); errors name the
    line. Without tritonclient installed: None, or BundleError when ``required``."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        if required:
            raise BundleError("validating config.pbtxt needs tritonclient (requirements/runtime.txt)") from None
        return None
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise BundleError(f"config.pbtxt does not match Triton's model-config schema: {exc}") from None
    return config


# --------------------------------------------------------------------------- configs


def _tensors(tensors: Iterable, dims: Mapping[str, list[int]]) -> list[dict[str, Any]]:
    return [{"name": t.name, "data_type": Enum(CONFIG_DTYPES[t.dtype]), "dims": dims[t.name]} for t in tensors]


def part_config(
    spec: PartSpec,
    options: RepositoryOptions,
    *,
    bundle_name: str,
    max_batch: int,
    precision: str,
    extra_parameters: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """config.pbtxt of one part's model, as a dict for :func:`to_pbtxt`."""
    batched = triton_batching(spec)
    dims = config_dims(spec, batched)
    config: dict[str, Any] = {"name": model_name(options.prefix, spec.name)}
    if options.platform == "python":
        config["backend"] = "python"
    else:
        config["platform"] = PLATFORMS[options.platform]
    config["max_batch_size"] = max_batch if batched else 0
    config["input"] = _tensors(spec.inputs, dims)
    config["output"] = _tensors(spec.outputs, dims)
    if batched and max_batch > 1:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": options.queue_delay_us}
    config["instance_group"] = [{"kind": Enum(options.instance_kind), "count": options.instances}]
    parameters = {
        PARAM_PART: spec.name,
        PARAM_SHA256: spec.sha256,
        PARAM_WEIGHTS: spec.weights_sha256,
        PARAM_PRECISION: precision,
        PARAM_BUNDLE: bundle_name,
        PARAM_MAX_BATCH: str(max_batch),
    }
    if options.platform == "python":
        parameters["onnx_file"] = "model.onnx"
    parameters.update(extra_parameters or {})
    config["parameters"] = parameters
    return config


def request_config(options: RepositoryOptions, max_batch: Mapping[str, int], precision: str) -> dict[str, Any]:
    parameters = {"sam3_prefix": options.prefix, "sam3_precision": precision}
    parameters.update({f"sam3_max_batch_{part}": str(max_batch[part]) for part in PART_NAMES})
    parameters.update({k: str(v) for k, v in options.limits.items()})
    return {
        "name": request_model_name(options.prefix),
        "backend": "python",
        "max_batch_size": 0,
        "input": [
            {"name": "image", "data_type": Enum("TYPE_UINT8"), "dims": [-1], "optional": True},
            {"name": "request", "data_type": Enum("TYPE_UINT8"), "dims": [-1]},
        ],
        "output": [{"name": "result", "data_type": Enum("TYPE_UINT8"), "dims": [-1]}],
        "instance_group": [{"kind": Enum("KIND_CPU"), "count": options.request_instances}],
        "parameters": parameters,
    }


# --------------------------------------------------------------------------- TensorRT plans


@dataclass(frozen=True)
class PlanChoice:
    path: Path
    max_batch: int
    tensorrt: str
    device: str


def find_plan(bundle: Bundle, spec: PartSpec, precision: str, engines_dir: Path) -> PlanChoice:
    """The one current plan our builder made for this part's graph at ``precision``."""
    from engines.tensorrt_build import LOG_SUFFIX, PLAN_SUFFIX, is_plan_current

    found: list[PlanChoice] = []
    for log in sorted(engines_dir.glob(f"{spec.name}.*{LOG_SUFFIX}")) if engines_dir.is_dir() else []:
        try:
            record = json.loads(log.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        inputs = record.get("key_inputs", {})
        if inputs.get("onnx_sha256") != spec.sha256 or inputs.get("precision") != precision:
            continue
        plan = log.with_name(str(record.get("plan", "")))
        if not plan.name.endswith(PLAN_SUFFIX) or not is_plan_current(plan, str(record.get("key", ""))):
            continue
        settings = record.get("settings", {})
        batch = settings.get("max_batch") or spec.max_batch
        found.append(PlanChoice(plan, int(batch), str(inputs.get("tensorrt", "")), str(record.get("device", ""))))
    if not found:
        raise BundleError(
            f"no current {precision} TensorRT plan of {spec.name} in {engines_dir}: build them first "
            f"(python -m engines build {bundle.root} --precision {precision}) with the TensorRT version "
            "of the Triton release that will serve them, or export --platform onnxruntime"
        )
    if len(found) > 1:
        listed = ", ".join(f"{c.path.name} (TensorRT {c.tensorrt}, {c.device})" for c in found)
        raise BundleError(f"several {precision} plans of {spec.name} in {engines_dir}: {listed}; "
                          "pass --engines-dir with the plans of the target GPU only")
    return found[0]


# --------------------------------------------------------------------------- the repository


def write_repository(bundle_dir: str | Path, out: str | Path, options: RepositoryOptions | None = None) -> dict[str, Any]:
    """Write the model repository atomically; returns the summary stored in its marker file."""
    options = options or RepositoryOptions()
    bundle = Bundle(bundle_dir)
    manifest = bundle.manifest
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise BundleError(f"{out} exists and is not a repository this command wrote; choose another OUT")
    # Everything is decided (and every config validated) before a byte is written.
    plans: dict[str, PlanChoice] = {}
    if options.platform == "tensorrt":
        engines_dir = Path(options.engines_dir) if options.engines_dir else bundle.engines_dir
        plans = {part: find_plan(bundle, manifest.part(part), options.precision, engines_dir) for part in PART_NAMES}
    max_batch: dict[str, int] = {}
    configs: dict[str, str] = {}
    for part in PART_NAMES:
        spec = manifest.part(part)
        extra: dict[str, str] = {}
        if part in plans:
            batch = plans[part].max_batch
            extra = {"sam3_tensorrt": plans[part].tensorrt, "sam3_built_on": plans[part].device}
        else:  # ONNX Runtime has no profile: the manifest's batch is a default, not a limit
            batch = options.max_batch or max(1, spec.max_batch)
        max_batch[part] = batch
        text = to_pbtxt(part_config(spec, options, bundle_name=manifest.name, max_batch=batch,
                                    precision=options.graph_precision, extra_parameters=extra))
        validate_pbtxt(text)
        configs[part] = text
    request_text = to_pbtxt(request_config(options, max_batch, options.graph_precision))
    if options.request_model:
        validate_pbtxt(request_text)

    staging = staging_directory(out)
    try:
        for part in PART_NAMES:
            spec = manifest.part(part)
            model_dir = staging / model_name(options.prefix, part)
            version = model_dir / "1"
            version.mkdir(parents=True)
            (model_dir / "config.pbtxt").write_text(configs[part], encoding="utf-8")
            if options.platform == "tensorrt":
                shutil.copyfile(plans[part].path, version / "model.plan")
            else:
                shutil.copyfile(bundle.part_path(part), version / "model.onnx")
                for extra_file in spec.external_data:  # the graph names these files: keep the names
                    shutil.copyfile(bundle.path(extra_file), version / Path(extra_file).name)
            if options.platform == "python":
                shutil.copyfile(MODELS_SRC / "onnx_part.py", version / "model.py")
                shutil.copyfile(MODELS_SRC / "sam3_tensors.py", version / "sam3_tensors.py")
        if options.request_model:
            model_dir = staging / request_model_name(options.prefix)
            version = model_dir / "1"
            (version / "bundle").mkdir(parents=True)
            (model_dir / "config.pbtxt").write_text(request_text, encoding="utf-8")
            shutil.copyfile(MODELS_SRC / "sam3_request.py", version / "model.py")
            shutil.copyfile(MODELS_SRC / "sam3_tensors.py", version / "sam3_tensors.py")
            shutil.copytree(ENGINES_SRC, version / "engines",
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.md", "__main__.py"))
            shutil.copyfile(bundle.root / "manifest.json", version / "bundle" / "manifest.json")
            shutil.copyfile(bundle.tokenizer_path, version / "bundle" / manifest.tokenizer.file)
        summary = {
            "bundle": manifest.name,
            "bundle_parts": {p: manifest.part(p).sha256 for p in PART_NAMES},
            "platform": options.platform,
            "precision": options.graph_precision,
            "prefix": options.prefix,
            "models": [model_name(options.prefix, p) for p in PART_NAMES]
            + ([request_model_name(options.prefix)] if options.request_model else []),
            "max_batch": max_batch,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_atomic(staging / MARKER, (json.dumps(summary, indent=2) + "\n").encode())
        commit_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


# --------------------------------------------------------------------------- CLI


def add_parser(sub: Any) -> None:
    """``python -m export triton``; registered by export/__main__.py."""
    p = sub.add_parser("triton", help="write a Triton Inference Server model repository from a bundle")
    p.add_argument("bundle", type=Path, help="bundle directory")
    p.add_argument("out", type=Path, help="model repository to write (replaced atomically)")
    p.add_argument("--platform", choices=tuple(PLATFORMS), default="tensorrt",
                   help="tensorrt: plans from `python -m engines build`; onnxruntime: the ONNX graphs; "
                        "python: the ONNX graphs on ONNX Runtime in Triton's Python backend (CPU, PyTriton)")
    p.add_argument("--precision", choices=("fp16", "fp32"), default="fp16", help="tensorrt: which plans")
    p.add_argument("--engines-dir", type=Path, default=None, help="tensorrt: where the plans are (default BUNDLE/engines)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="model name prefix (several bundles on one Triton)")
    p.add_argument("--instances", type=int, default=1, help="instances of each part model")
    p.add_argument("--request-instances", type=int, default=2, help="instances of the whole-request model")
    p.add_argument("--kind", choices=("KIND_GPU", "KIND_CPU"), default=None,
                   help="part instances (default: GPU, CPU for --platform python)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="onnxruntime/python: Triton max_batch_size of the batched parts (default: the manifest's)")
    p.add_argument("--queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US, help="dynamic batching delay")
    p.add_argument("--no-request-model", dest="request_model", action="store_false",
                   help="only the three part models")
    p.set_defaults(func=cmd_triton)


def cmd_triton(args: argparse.Namespace) -> int:
    options = RepositoryOptions(
        platform=args.platform, prefix=args.prefix, precision=args.precision if args.platform == "tensorrt" else "fp32",
        engines_dir=args.engines_dir, instances=args.instances, request_instances=args.request_instances,
        kind=args.kind, max_batch=args.max_batch, queue_delay_us=args.queue_delay_us, request_model=args.request_model,
    )
    summary = write_repository(args.bundle, args.out, options)
    print(f"wrote {args.out}: {', '.join(summary['models'])} ({summary['platform']}, {summary['precision']}); "
          f"serve with: tritonserver --model-repository {args.out}")
    return 0
