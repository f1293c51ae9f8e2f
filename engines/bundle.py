"""The bundle manifest: the one source of truth for the tensor contract.

A bundle is a directory holding its ONNX graphs (image encoder, text encoder, decoder, and the
geometry encoder + exemplar decoder for box prompts), a tokenizer and ``manifest.json``.
Export writes it through :func:`write_manifest` into a staging directory renamed into place by
:func:`commit_directory`; the runtime and server only ever read it through :class:`Bundle`. This module is torch-free on purpose: the Jetson runtime imports
it, and nothing under ``engines/`` or ``server/`` may import ``export/``.

Tensor names live here (``TensorNames``) and are recorded in the manifest; code elsewhere
asks the manifest (``bundle.part("decoder").input("text_features")``) or uses these
constants, never loose string literals.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from engines.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
ENGINES_DIR = "engines"
BATCH = "batch"  # the one symbolic dimension a graph may have

PART_NAMES = ("image_encoder", "text_encoder", "decoder")
# Optional graphs for exemplar (box) prompts; a bundle without them serves text prompts only.
EXEMPLAR_PART_NAMES = ("geometry_encoder", "exemplar_decoder")


class TensorNames:
    """Graph input/output names shared by export (writer) and runtime (reader)."""

    PIXEL_VALUES = "pixel_values"
    FPN = ("fpn_0", "fpn_1", "fpn_2")  # 4x, 2x, 1x the ViT grid; the 0.5x level is pruned
    GEOMETRY_CLS = "geometry_cls"  # geometry-encoder CLS token with no boxes (image-only)
    INPUT_IDS = "input_ids"
    ATTENTION_MASK = "attention_mask"
    TEXT_FEATURES = "text_features"
    TEXT_MASK = "text_mask"
    PRED_MASKS = "pred_masks"
    PRED_BOXES = "pred_boxes"  # normalised xyxy
    PRED_LOGITS = "pred_logits"
    PRESENCE_LOGITS = "presence_logits"
    INPUT_BOXES = "input_boxes"  # exemplar boxes, normalised cxcywh (transformers' input_boxes)
    INPUT_BOXES_LABELS = "input_boxes_labels"  # 1 positive, 0 negative, -10 padding
    GEOMETRY_FEATURES = "geometry_features"  # geometry-encoder tokens: K boxes, then CLS
    GEOMETRY_MASK = "geometry_mask"  # 1 where a geometry token is valid

    IMAGE_EMBEDDING = (*FPN, GEOMETRY_CLS)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int32, int64, bool
    shape: tuple[int | str, ...]  # ints, or BATCH for the dynamic batch axis

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TensorSpec":
        return cls(name=str(data["name"]), dtype=str(data["dtype"]), shape=tuple(data["shape"]))

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else int(d) for d in self.shape)

    @property
    def has_batch(self) -> bool:
        return BATCH in self.shape


@dataclass(frozen=True)
class PartSpec:
    """One exported graph."""

    name: str
    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    weights_sha256: str = ""  # content hash of the part's weights (shared-encoder detection)
    fp32_layers: tuple[str, ...] = ()  # ONNX node names the TensorRT builder must keep in FP32
    external_data: tuple[str, ...] = ()  # files holding initializers of graphs > 2 GB
    max_batch: int = 1  # profile max for the batch axis (decoder: prompts per call)

    def input(self, name: str) -> TensorSpec:
        return _find(self.inputs, name, f"input of {self.name}")

    def output(self, name: str) -> TensorSpec:
        return _find(self.outputs, name, f"output of {self.name}")

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "weights_sha256": self.weights_sha256,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "fp32_layers": list(self.fp32_layers),
            "external_data": list(self.external_data),
            "max_batch": self.max_batch,
        }

    @classmethod
    def from_json(cls, name: str, data: Mapping[str, Any]) -> "PartSpec":
        return cls(
            name=name,
            file=str(data["file"]),
            sha256=str(data["sha256"]),
            weights_sha256=str(data.get("weights_sha256", "")),
            inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            fp32_layers=tuple(data.get("fp32_layers", ())),
            external_data=tuple(data.get("external_data", ())),
            max_batch=int(data.get("max_batch", 1)),
        )


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs to know about the model, independent of tensor shapes."""

    architecture: str  # "sam3"
    image_size: int
    patch_size: int
    hidden_size: int  # prompt/feature width (256 at full size)
    num_queries: int
    mask_size: tuple[int, int]  # pred_masks spatial size (4x the ViT grid)
    parameters: dict[str, int] = field(default_factory=dict)  # per part
    config: dict[str, Any] = field(default_factory=dict)  # full transformers Sam3Config dict


@dataclass(frozen=True)
class Preprocessing:
    """How Meta's processor turns an image into ``pixel_values`` (see engines/preprocess.py)."""

    image_size: int
    resize: str = "bilinear_antialias_uint8"  # resize the uint8 image, then rescale
    rescale_factor: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class TokenizerInfo:
    file: str
    sha256: str
    context_length: int
    pad_id: int
    bos_id: int
    eos_id: int


@dataclass(frozen=True)
class SourceInfo:
    checkpoint: str  # file or directory name (not a full path: bundles move between machines)
    checkpoint_sha256: str
    format: str  # hf | meta | meta-trainer | demo
    loras: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Manifest:
    name: str
    model: ModelInfo
    preprocessing: Preprocessing
    tokenizer: TokenizerInfo
    parts: dict[str, PartSpec]
    source: SourceInfo
    parity: dict[str, Any] = field(default_factory=dict)
    fp16_range: dict[str, Any] = field(default_factory=dict)
    op_audit: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)  # exporter, opset, library versions
    # What the model is for people: description, vocabulary it was trained on, whether its
    # weights are random (the page and /info show it). Optional: {} for real SAM3 weights.
    card: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def part(self, name: str) -> PartSpec:
        try:
            return self.parts[name]
        except KeyError:
            raise BundleError(f"manifest has no part {name!r} (has {sorted(self.parts)})") from None

    @property
    def max_boxes(self) -> int:
        """Exemplar boxes per prompt this bundle takes (the geometry graph's box axis); 0: text only."""
        if not all(name in self.parts for name in EXEMPLAR_PART_NAMES):
            return 0
        return int(self.parts["geometry_encoder"].input(TensorNames.INPUT_BOXES).shape[1])

    @property
    def capabilities(self) -> dict[str, Any]:
        """What a client may ask of this bundle: text prompts always, exemplar boxes with the graphs."""
        return {"text_prompts": True, "exemplar_boxes": self.max_boxes > 0, "max_boxes": self.max_boxes}

    def summary(self) -> dict[str, Any]:
        """What a client is told of this bundle (the server's /info): the model, its card, the
        parts' files and hashes, where it came from and what it can be asked; no parity reports."""
        model = self.model
        return {
            "name": self.name,
            "card": dict(self.card),
            "schema_version": self.schema_version,
            "architecture": model.architecture,
            "image_size": model.image_size,
            "patch_size": model.patch_size,
            "hidden_size": model.hidden_size,
            "num_queries": model.num_queries,
            "mask_size": list(model.mask_size),
            "parameters": dict(model.parameters),
            "tokenizer": {"context_length": self.tokenizer.context_length, "sha256": self.tokenizer.sha256},
            "parts": {name: {"file": part.file, "sha256": part.sha256, "max_batch": part.max_batch}
                      for name, part in self.parts.items()},
            "source": {
                "checkpoint": self.source.checkpoint,
                "checkpoint_sha256": self.source.checkpoint_sha256,
                "format": self.source.format,
                "loras": list(self.source.loras),
            },
            "capabilities": self.capabilities,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "model": _plain(dataclasses.asdict(self.model)),
            "preprocessing": _plain(dataclasses.asdict(self.preprocessing)),
            "tokenizer": dataclasses.asdict(self.tokenizer),
            "parts": {name: spec.to_json() for name, spec in self.parts.items()},
            "source": _plain(dataclasses.asdict(self.source)),
            "parity": self.parity,
            "fp16_range": self.fp16_range,
            "op_audit": self.op_audit,
            "export": self.export,
            "card": self.card,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Manifest":
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"manifest schema_version {version!r} is not supported (this runtime reads {SCHEMA_VERSION})"
            )
        try:
            model = dict(data["model"])
            model["mask_size"] = tuple(model["mask_size"])
            prep = dict(data["preprocessing"])
            prep["mean"] = tuple(prep["mean"])
            prep["std"] = tuple(prep["std"])
            source = dict(data["source"])
            source["loras"] = tuple(source.get("loras", ()))
            parts = {name: PartSpec.from_json(name, spec) for name, spec in data["parts"].items()}
            manifest = cls(
                schema_version=version,
                name=str(data["name"]),
                model=ModelInfo(**model),
                preprocessing=Preprocessing(**prep),
                tokenizer=TokenizerInfo(**data["tokenizer"]),
                parts=parts,
                source=SourceInfo(**source),
                parity=dict(data.get("parity", {})),
                fp16_range=dict(data.get("fp16_range", {})),
                op_audit=dict(data.get("op_audit", {})),
                export=dict(data.get("export", {})),
                card=dict(data.get("card", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"manifest is malformed: {exc!r}") from exc
        missing = [p for p in PART_NAMES if p not in manifest.parts]
        if missing:
            raise BundleError(f"manifest lacks parts {missing}")
        _check_types(manifest, "manifest")
        return manifest


def _check_types(obj: Any, where: str) -> None:
    """Every field of a manifest dataclass has its annotated type: a mistyped manifest is one
    clear BundleError at load, not a TypeError in the middle of a request."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        _check_value(getattr(obj, f.name), hints[f.name], f"{where}.{f.name}")


def _check_value(value: Any, hint: Any, where: str) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _check_value(value, option, where)
            except BundleError as exc:
                errors.append(exc)
        raise errors[0]
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise BundleError(f"{where} must be an object, got {value!r}")
        return _check_types(value, where)
    if origin is tuple:
        if not isinstance(value, tuple):
            raise BundleError(f"{where} must be a list, got {value!r}")
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise BundleError(f"{where} must have {len(items)} items, got {value!r}")
        for i, (item, item_hint) in enumerate(zip(value, items)):
            _check_value(item, item_hint, f"{where}[{i}]")
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise BundleError(f"{where} must be an object, got {value!r}")
        for key, item in value.items():
            _check_value(item, args[1], f"{where}.{key}")
        return
    expected = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}.get(hint)
    if expected is None:
        return
    if isinstance(value, bool) and hint is not bool or not isinstance(value, expected):
        raise BundleError(f"{where} must be {hint.__name__}, got {value!r}")


class Bundle:
    """A validated bundle directory: the only way the runtime reads one."""

    def __init__(self, root: str | os.PathLike[str], *, verify_hashes: bool = True) -> None:
        self.root = Path(root)
        manifest_path = self.root / MANIFEST_FILE
        if not self.root.is_dir():
            raise BundleError(f"bundle directory {self.root} does not exist")
        if not manifest_path.is_file():
            raise BundleError(f"{self.root} is not a bundle: {MANIFEST_FILE} is missing")
        try:
            data = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"cannot read {manifest_path}: {exc}") from exc
        if not isinstance(data, dict):
            raise BundleError(f"{manifest_path} is not a JSON object")
        try:
            self.manifest = Manifest.from_json(data)
        except BundleError as exc:
            raise BundleError(f"{manifest_path}: {exc}") from exc
        self._check_files(verify_hashes)

    def _check_files(self, verify_hashes: bool) -> None:
        expected = [(spec.file, spec.sha256) for spec in self.manifest.parts.values()]
        expected.append((self.manifest.tokenizer.file, self.manifest.tokenizer.sha256))
        for spec in self.manifest.parts.values():
            for extra in spec.external_data:
                if not (self.root / extra).is_file():
                    raise BundleError(f"bundle file {extra} (external data of {spec.name}) is missing")
        for rel, digest in expected:
            path = self.root / rel
            if not path.is_file():
                raise BundleError(f"bundle file {rel} is missing from {self.root}")
            if verify_hashes and sha256_file(path) != digest:
                raise BundleError(f"bundle file {rel} is corrupt: sha256 does not match the manifest")

    def part(self, name: str) -> PartSpec:
        return self.manifest.part(name)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def part_path(self, name: str) -> Path:
        return self.root / self.part(name).file

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.manifest.tokenizer.file

    @property
    def engines_dir(self) -> Path:
        return self.root / ENGINES_DIR


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest(directory: str | os.PathLike[str], manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST_FILE
    path.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def commit_directory(staging: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Atomically replace ``target`` with the fully written ``staging`` directory.

    ``staging`` must live on the same filesystem (use :func:`staging_directory`). An existing
    target is moved aside first and removed only after the new one is in place, so a crash
    leaves either the old bundle or the new one, never a half-written mix.
    """
    staging, target = Path(staging), Path(target)
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, backup)
    try:
        os.replace(staging, target)
    except OSError:
        if backup is not None:
            os.replace(backup, target)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return target


def staging_directory(target: str | os.PathLike[str]) -> Path:
    """A fresh temporary directory beside ``target`` (same filesystem, so rename is atomic)."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes 0700; the bundle is mounted read-only for a non-root user
    return staging


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a file so readers see either the old content or the new, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; bundles/plans are read by other users (containers)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _find(specs: Iterable[TensorSpec], name: str, what: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise BundleError(f"no {what} named {name!r}")


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, for JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
