"""Proof that the exported graphs compute what the PyTorch reference computes.

Three checks, all written into the manifest by every build:
- parity: ONNX Runtime (CPU, fp32) vs PyTorch per part and end to end (the reference is
  transformers' full forward with Meta's semantics, ``split.reference_forward``), on real
  photos (scikit-image's samples) and synthetic images. The build fails outside the bounds.
- op audit: every ONNX node type is in TensorRT's ONNX operator support list
  (``export/data/tensorrt_onnx_ops.json``, with its source).
- FP16 range: max |activation| entering LayerNorm / Softmax / MatMul / Linear in fp32, and the
  fp16-vs-fp32 output error of each part (PyTorch on CPU). Layers whose inputs come within
  2x of the fp16 limit are recorded as ONNX node names for the TensorRT builder to pin to FP32.
"""

from __future__ import annotations

import ast
import collections
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from engines.bundle import TensorNames as T
from export.split import reference_forward

OPS_FILE = Path(__file__).with_name("data") / "tensorrt_onnx_ops.json"
FP16_MAX = 65504.0
FP16_RISK = FP16_MAX / 2  # within 2x of overflow: pin to FP32
MASK_SENTINEL = 1e30  # |x| at or above this is an additive attention mask, not an activation


@dataclass(frozen=True)
class ParityBounds:
    """Build-failing bounds (fp32), from the export issue."""

    logits_max_abs: float = 1e-3
    mask_iou_min: float = 0.99


class VerificationError(RuntimeError):
    """Exported graphs disagree with the reference beyond the bounds."""


@dataclass(frozen=True)
class PromptCase:
    """One end-to-end case: an image and a batch of prompts."""

    name: str
    pixel_values: torch.Tensor  # [1, 3, S, S]
    input_ids: torch.Tensor  # [N, L] int32
    attention_mask: torch.Tensor  # [N, L] int32


def ort_session(path: Path) -> ort.InferenceSession:
    """A CPU session tuned for memory, not speed: verification runs beside the PyTorch model.

    At full size the default session keeps its arena at the peak of the last run (global
    attention alone is 1.7 GB per matrix) and pre-packs a second copy of every MatMul weight;
    together with the reference model that went past 24 GB on our 2-core, 24 GB machine.
    """
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def max_errors(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else max_abs}


def mask_iou(got_logits: np.ndarray, ref_logits: np.ndarray, threshold: float = 0.0) -> float:
    """IoU of the thresholded masks (all queries together); 1.0 when both are empty."""
    got, ref = got_logits > threshold, ref_logits > threshold
    union = np.logical_or(got, ref).sum()
    return float(np.logical_and(got, ref).sum() / union) if union else 1.0


def part_parity(parts: dict[str, nn.Module], sessions: dict[str, ort.InferenceSession],
                inputs: dict[str, Sequence[torch.Tensor]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per part, per output: ORT vs the PyTorch wrapper on the same inputs."""
    report: dict[str, dict[str, dict[str, float]]] = {}
    for name, module in parts.items():
        session = sessions[name]
        args = inputs[name]
        with torch.no_grad():
            ref = module(*args)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = session.run(None, {n: a.numpy() for n, a in zip(module.input_names, args)})
        report[name] = {out: max_errors(g, r.numpy()) for out, g, r in zip(module.output_names, got, ref)}
    return report


def run_chain(sessions: dict[str, ort.InferenceSession], case: PromptCase) -> dict[str, np.ndarray]:
    """The runtime's data flow (image -> text -> decoder) through ONNX Runtime."""
    image_session = sessions["image_encoder"]
    image = image_session.run(None, {T.PIXEL_VALUES: case.pixel_values.numpy()})
    image_tensors = {output.name: value for output, value in zip(image_session.get_outputs(), image)}
    ids, mask = case.input_ids.numpy(), case.attention_mask.numpy()
    (text,) = sessions["text_encoder"].run(None, {T.INPUT_IDS: ids, T.ATTENTION_MASK: mask})
    outputs = sessions["decoder"].run(None, {**image_tensors, T.TEXT_FEATURES: text, T.TEXT_MASK: mask})
    return dict(zip((T.PRED_MASKS, T.PRED_BOXES, T.PRED_LOGITS, T.PRESENCE_LOGITS), outputs))


def end_to_end_parity(model, sessions: dict[str, ort.InferenceSession],
                      cases: Iterable[PromptCase]) -> dict[str, dict]:
    """ORT three-graph chain vs the full PyTorch forward (Meta semantics), per case."""
    report = {}
    for case in cases:
        got = run_chain(sessions, case)
        with torch.no_grad():
            ref = {k: v.numpy() for k, v in reference_forward(
                model, case.pixel_values, case.input_ids, case.attention_mask).items()}
        entry = {name: max_errors(got[name], ref[name]) for name in ref}
        entry["mask_iou"] = mask_iou(got[T.PRED_MASKS], ref[T.PRED_MASKS])
        entry["same_top_query"] = bool(
            np.array_equal(got[T.PRED_LOGITS].argmax(-1), ref[T.PRED_LOGITS].argmax(-1)))
        report[case.name] = entry
    return report


@dataclass(frozen=True)
class ExemplarCase:
    """One exemplar case: an image, one prompt's text (or "visual") and its boxes, padded to K."""

    name: str
    pixel_values: torch.Tensor  # [1, 3, S, S]
    input_ids: torch.Tensor  # [1, L] int32
    attention_mask: torch.Tensor  # [1, L] int32
    boxes: torch.Tensor  # [1, K, 4] normalised cxcywh, valid boxes first
    labels: torch.Tensor  # [1, K] int32: 1 positive, 0 negative, -10 padding

    @property
    def count(self) -> int:
        return int((self.labels != -10).sum())


# name -> (boxes (normalised cxcywh), labels, text or None): None is a box-only prompt, whose
# text both references set to "visual" (Meta's add_geometric_prompt, transformers' processor).
EXEMPLAR_PROMPTS: dict[str, tuple[list[list[float]], list[int], str | None]] = {
    "one_positive": ([[0.5, 0.45, 0.3, 0.4]], [1], None),
    "three_positive": ([[0.3, 0.3, 0.2, 0.25], [0.7, 0.6, 0.3, 0.5], [0.5, 0.5, 1.0, 1.0]], [1, 1, 1], None),
    "positive_and_negative": ([[0.35, 0.4, 0.25, 0.3], [0.7, 0.7, 0.2, 0.2]], [1, 0], None),
    "positive_with_text": ([[0.4, 0.6, 0.5, 0.3]], [1], "a photo of a cat"),
    "negative_with_text": ([[0.2, 0.8, 0.1, 0.2]], [0], "a photo of a cat"),
}


def build_exemplar_cases(pixel_values: torch.Tensor,
                         encode: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]],
                         max_boxes: int) -> list[ExemplarCase]:
    cases = []
    for name, (boxes, labels, text) in EXEMPLAR_PROMPTS.items():
        ids, mask = encode([text if text is not None else "visual"])
        padded = torch.zeros(1, max_boxes, 4)
        padded[0, : len(boxes)] = torch.tensor(boxes)
        padded_labels = torch.full((1, max_boxes), -10, dtype=torch.int32)
        padded_labels[0, : len(labels)] = torch.tensor(labels, dtype=torch.int32)
        cases.append(ExemplarCase(name, pixel_values, torch.from_numpy(ids), torch.from_numpy(mask),
                                  padded, padded_labels))
    return cases


def run_exemplar_chain(sessions: dict[str, ort.InferenceSession], case: ExemplarCase) -> dict[str, np.ndarray]:
    """The runtime's exemplar data flow: image -> text -> geometry encoder -> exemplar decoder."""
    image_session = sessions["image_encoder"]
    image = image_session.run(None, {T.PIXEL_VALUES: case.pixel_values.numpy()})
    image_tensors = {output.name: value for output, value in zip(image_session.get_outputs(), image)}
    ids, mask = case.input_ids.numpy(), case.attention_mask.numpy()
    (text,) = sessions["text_encoder"].run(None, {T.INPUT_IDS: ids, T.ATTENTION_MASK: mask})
    geometry_session = sessions["geometry_encoder"]
    geometry_inputs = [i.name for i in geometry_session.get_inputs()]
    geometry, geometry_mask = geometry_session.run(None, {
        geometry_inputs[0]: image_tensors[geometry_inputs[0]],
        T.INPUT_BOXES: case.boxes.numpy(), T.INPUT_BOXES_LABELS: case.labels.numpy()})
    levels = {k: v for k, v in image_tensors.items() if k != T.GEOMETRY_CLS}
    outputs = sessions["exemplar_decoder"].run(None, {
        **levels, T.TEXT_FEATURES: text, T.TEXT_MASK: mask,
        T.GEOMETRY_FEATURES: geometry, T.GEOMETRY_MASK: geometry_mask})
    return dict(zip((T.PRED_MASKS, T.PRED_BOXES, T.PRED_LOGITS, T.PRESENCE_LOGITS), outputs))


def exemplar_parity(model, sessions: dict[str, ort.InferenceSession],
                    cases: Iterable[ExemplarCase]) -> dict[str, dict]:
    """ORT exemplar chain vs transformers' forward with ``input_boxes``/``input_boxes_labels``."""
    report = {}
    for case in cases:
        got = run_exemplar_chain(sessions, case)
        n = case.count  # transformers is given only the valid boxes
        with torch.no_grad():
            ref = {k: v.numpy() for k, v in reference_forward(
                model, case.pixel_values, case.input_ids, case.attention_mask,
                case.boxes[:, :n], case.labels[:, :n]).items()}
        entry = {name: max_errors(got[name], ref[name]) for name in ref}
        entry["mask_iou"] = mask_iou(got[T.PRED_MASKS], ref[T.PRED_MASKS])
        entry["same_top_query"] = bool(
            np.array_equal(got[T.PRED_LOGITS].argmax(-1), ref[T.PRED_LOGITS].argmax(-1)))
        report[case.name] = entry
    return report


def summarize(e2e: dict[str, dict]) -> dict[str, float | bool]:
    """The worst case over all end-to-end cases: the figures a reader looks at first."""
    worst = lambda key: max(c[key]["max_abs"] for c in e2e.values())  # noqa: E731
    return {
        "cases": len(e2e),
        "logits_max_abs": worst(T.PRED_LOGITS),
        "presence_max_abs": worst(T.PRESENCE_LOGITS),
        "boxes_max_abs": worst(T.PRED_BOXES),
        "mask_logits_max_abs": worst(T.PRED_MASKS),
        "mask_iou_min": min(c["mask_iou"] for c in e2e.values()),
        "same_top_query": all(c["same_top_query"] for c in e2e.values()),
    }


def check_bounds(summary: dict, bounds: ParityBounds) -> None:
    problems = []
    for key in ("logits_max_abs", "presence_max_abs"):
        if not summary[key] <= bounds.logits_max_abs:  # also catches NaN
            problems.append(f"{key} {summary[key]:.3g} > {bounds.logits_max_abs}")
    if not summary["mask_iou_min"] >= bounds.mask_iou_min:
        problems.append(f"mask IoU {summary['mask_iou_min']:.5f} < {bounds.mask_iou_min}")
    if problems:
        raise VerificationError("ONNX parity check failed: " + "; ".join(problems))


# --- TensorRT op audit ----------------------------------------------------------------------

def op_audit(paths: dict[str, Path], ops_file: Path = OPS_FILE) -> dict:
    """Every node type of every graph against TensorRT's ONNX operator support list."""
    table = json.loads(ops_file.read_text())
    supported = {op for op, row in table["operators"].items() if row["supported"]}
    report: dict = {"source": table["source"], "parts": {}}
    for name, path in paths.items():
        graph = onnx.load(str(path), load_external_data=False).graph
        counts = collections.Counter(node.op_type for node in graph.node)
        report["parts"][name] = {
            "nodes": sum(counts.values()),
            "ops": dict(sorted(counts.items())),
            "unsupported": sorted(op for op in counts if op not in supported),
        }
    report["all_supported"] = not any(p["unsupported"] for p in report["parts"].values())
    return report


# --- FP16 range -----------------------------------------------------------------------------

_WATCHED = {
    torch.nn.functional.layer_norm: "LayerNorm",
    torch.nn.functional.softmax: "Softmax",
    torch.softmax: "Softmax",
    torch.Tensor.softmax: "Softmax",
    torch.matmul: "MatMul",
    torch.Tensor.matmul: "MatMul",
    torch.Tensor.__matmul__: "MatMul",
    torch.nn.functional.linear: "Linear",
    torch.einsum: "MatMul",
}


class _ActivationRange(TorchFunctionMode):
    """Max |input| per (module path, op kind), recorded while the fp32 reference runs."""

    def __init__(self) -> None:
        super().__init__()
        self.scope: list[str] = []
        self.max_abs: dict[tuple[str, str], float] = collections.defaultdict(float)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = _WATCHED.get(func)
        if kind is not None:
            tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            if func in (torch.nn.functional.linear,):
                tensors = tensors[:1]  # the activation, not the weight
            values = [_finite_max_abs(t) for t in tensors if t.numel()]
            if values:
                key = (self.scope[-1] if self.scope else "", kind)
                self.max_abs[key] = max(self.max_abs[key], *values)
        return func(*args, **(kwargs or {}))


def _finite_max_abs(tensor: torch.Tensor) -> float:
    """Max |x| ignoring additive attention-mask sentinels (finfo.min, -inf).

    Masked logits are meant to be huge negatives; TensorRT's fused softmax handles them, and
    counting them would flag every masked attention. Everything else must fit in fp16.
    """
    low, high = torch.aminmax(tensor.detach())  # no |x| copy: attention scores are GBs at full size
    largest = max(-float(low), float(high))
    if largest < MASK_SENTINEL:
        return largest
    values = tensor.detach().abs()
    values = values[values < MASK_SENTINEL]
    return float(values.max()) if values.numel() else 0.0


def _track_scopes(module: nn.Module, mode: _ActivationRange) -> list:
    def enter(path: str):
        def hook(_module, _args) -> None:
            mode.scope.append(path)
        return hook

    def leave(_module, _args, _output) -> None:  # must return None: a value would replace the output
        mode.scope.pop()

    handles = []
    for path, sub in module.named_modules():
        handles.append(sub.register_forward_pre_hook(enter(path)))
        handles.append(sub.register_forward_hook(leave))
    return handles


def _onnx_nodes_in_scope(path: Path) -> dict[str, list[str]]:
    """ONNX node names by the module path the dynamo exporter recorded for them."""
    graph = onnx.load(str(path), load_external_data=False).graph
    by_scope: dict[str, list[str]] = collections.defaultdict(list)
    for node in graph.node:
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes":
                scopes = ast.literal_eval(prop.value)  # full module paths, outermost first, then the op
                by_scope[scopes[-2] if len(scopes) > 1 else ""].append(node.name)
    return by_scope


def fp16_range(parts: dict[str, nn.Module], paths: dict[str, Path],
               inputs: dict[str, Sequence[torch.Tensor]],
               half_parts: dict[str, nn.Module] | None = None) -> dict:
    """Activation ranges in fp32 and the fp16-vs-fp32 error per part; layers to keep in FP32.

    ``half_parts`` are the same wrappers around a half-precision copy of the model; without
    them only the ranges are measured (CPUs have no fast fp16 matmul: at full size the
    half-precision run takes far longer than the whole export).
    """
    report: dict = {"fp16_max": FP16_MAX, "risk_threshold": FP16_RISK, "parts": {}}
    for name, module in parts.items():
        args = inputs[name]
        mode = _ActivationRange()
        handles = _track_scopes(module, mode)
        try:
            with torch.no_grad(), mode:
                ref = module(*args)
        finally:
            for handle in handles:
                handle.remove()
        ref = ref if isinstance(ref, tuple) else (ref,)
        half_error = (_half_precision_error(half_parts[name], args, ref) if half_parts is not None
                      else "not run (--skip-fp16-error-run)")
        risky = sorted({scope for (scope, _), value in mode.max_abs.items() if value > FP16_RISK})
        nodes = _onnx_nodes_in_scope(paths[name])
        pinned = sorted({n for scope in risky for key, names in nodes.items()
                         if key == scope or key.startswith(scope + ".") for n in names})
        by_kind: dict[str, float] = collections.defaultdict(float)
        for (_, kind), value in mode.max_abs.items():
            by_kind[kind] = max(by_kind[kind], value)
        top = sorted(mode.max_abs.items(), key=lambda kv: -kv[1])[:5]
        report["parts"][name] = {
            "max_abs_by_op": {k: round(v, 4) for k, v in sorted(by_kind.items())},
            "largest": [{"scope": s, "op": k, "max_abs": round(v, 4)} for (s, k), v in top],
            "fp16_output_error": half_error,
            "risky_scopes": risky,
            "fp32_layers": pinned,
        }
    return report


def _half_precision_error(module: nn.Module, args: Sequence[torch.Tensor],
                          ref: Sequence[torch.Tensor]) -> dict[str, dict[str, float]] | str:
    """Run the half-precision wrapper on CPU; errors per output vs fp32 (or why it could not run)."""
    half = module
    half_args = [a.half() if a.is_floating_point() else a for a in args]
    try:
        with torch.no_grad():
            out = half(*half_args)
    except (RuntimeError, NotImplementedError) as exc:  # an op without a CPU fp16 kernel
        return f"not run: {str(exc).splitlines()[0][:200]}"
    out = out if isinstance(out, tuple) else (out,)
    result = {}
    for out_name, got, want in zip(module.output_names, out, ref):
        got = got.float().numpy()
        errors = max_errors(got, want.numpy())
        errors["non_finite"] = int((~np.isfinite(got)).sum())
        result[out_name] = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                            for k, v in errors.items()}
    return result


def fp32_layers(report: dict) -> dict[str, list[str]]:
    return {name: part["fp32_layers"] for name, part in report["parts"].items()}


def sample_photos() -> dict[str, np.ndarray]:
    """Real photos shipped by scikit-image plus synthetic ones (uint8 RGB)."""
    from skimage import data

    photos = {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea()}
    rng = np.random.default_rng(0)
    photos["noise"] = rng.integers(0, 256, size=(200, 300, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:240, 0:320]
    photos["gradient"] = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
    return photos


def build_cases(photos: dict[str, np.ndarray], to_pixels: Callable[[np.ndarray], np.ndarray],
                encode: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]],
                prompts: Sequence[Sequence[str]]) -> list[PromptCase]:
    cases = []
    for (name, pixels), batch in zip(photos.items(), _cycle(prompts, len(photos))):
        ids, mask = encode(list(batch))
        cases.append(PromptCase(name=f"{name}:{'|'.join(batch)}", pixel_values=torch.from_numpy(to_pixels(pixels)),
                                input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)))
    return cases


def _cycle(items: Sequence, count: int) -> list:
    return [items[i % len(items)] for i in range(count)]
