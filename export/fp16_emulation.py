"""TensorRT FP16 on a CPU, emulated: a bundle copy whose graphs round to half precision as a
TensorRT FP16 engine stores its tensors, for measuring the *accuracy* cost of FP16 here.

What an FP16 engine does, and how each graph is rewritten to do the same under ONNX Runtime:

- weights are stored in FP16: every float initializer (and Constant) is clamped to FP16's range
  (as TensorRT does with out-of-range weights, e.g. -3.4e38 mask fills) and rounded to the
  nearest float16 value (kept as float32 numbers, so every CPU kernel runs);
- every layer's output tensor is FP16: each float output of a node is passed through
  ``Cast(float16) -> Cast(float32)``, so it carries exactly FP16's precision and range
  (overflow becomes inf, as on the GPU);
- layers the builder pins to FP32 are left alone: the op types the TensorRT builder always
  pins (normalisations, softmax, reductions: ``engines.tensorrt_build.FP32_LAYER_TYPES``) and the
  manifest's ``fp32_layers`` (ONNX node names from the export's FP16 range check).

Not emulated: accumulation inside a layer (TensorRT's FP16 GEMM tactics accumulate in FP32 on
Ampere tensor cores, as this emulation does) and kernel fusions that skip an intermediate
rounding (the emulation rounds at least as often as the engine, so it errs on the pessimistic
side). Only a run on the device confirms the engine's own numbers.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from engines.bundle import Bundle, Manifest, commit_directory, sha256_file, staging_directory, write_manifest

# ONNX op types that map to the TensorRT layer types an FP16 build keeps in FP32
# (NORMALIZATION, SOFTMAX, REDUCE; see engines/tensorrt_build.py).
PINNED_OP_TYPES = frozenset({
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization",
    "Softmax", "LogSoftmax",
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1",
    "ReduceSumSquare", "ReduceLogSumExp",
})
METHOD = ("fp16 emulation: float initializers rounded to float16; every float node output passed through "
          "Cast(float16)->Cast(float32) except normalisation/softmax/reduce ops and the manifest's fp32_layers")


FP16_MAX = float(np.finfo(np.float16).max)


def _to_fp16_values(array: np.ndarray) -> np.ndarray:
    return np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16).astype(np.float32)


def emulate_graph(source: Path, target: Path, fp32_layers: set[str]) -> dict[str, int]:
    """Rewrite one ONNX graph; returns counts of what was rounded."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(source))
    inferred = onnx.shape_inference.infer_shapes(model)
    float_values = {vi.name for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]
                    if vi.type.tensor_type.elem_type == TensorProto.FLOAT}
    graph = model.graph
    rounded_weights = 0
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            array = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(_to_fp16_values(array), init.name))
            rounded_weights += 1
    new_nodes = []
    rounded_outputs = 0
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                    array = numpy_helper.to_array(attr.t)
                    attr.t.CopyFrom(numpy_helper.from_array(_to_fp16_values(array), attr.t.name))
            new_nodes.append(node)
            continue
        pinned = node.op_type in PINNED_OP_TYPES or node.name in fp32_layers
        if pinned:
            new_nodes.append(node)
            continue
        casts = []
        for i, output in enumerate(node.output):
            if output and output in float_values:
                raw = f"{output}__fp32_raw"
                half = f"{output}__fp16"
                node.output[i] = raw
                casts.append(helper.make_node("Cast", [raw], [half], to=TensorProto.FLOAT16, name=f"{half}_cast"))
                casts.append(helper.make_node("Cast", [half], [output], to=TensorProto.FLOAT, name=f"{output}_cast"))
                rounded_outputs += 1
        new_nodes.append(node)
        new_nodes.extend(casts)
    del graph.node[:]
    graph.node.extend(new_nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    return {"rounded_weights": rounded_weights, "rounded_outputs": rounded_outputs}


def emulate_bundle(source: Path, out: Path) -> Manifest:
    """Write the FP16-emulation copy of ``source`` at ``out`` (atomically)."""
    base = Bundle(source)
    if base.manifest.export.get("quantization"):
        raise ValueError(f"{source} is already quantized or emulated; start from the fp32 bundle")
    if any(spec.external_data for spec in base.manifest.parts.values()):
        raise ValueError("fp16 emulation of graphs with external data (> 2 GB) is not supported")
    staging = staging_directory(out)
    try:
        for item in base.root.iterdir():
            if item.is_file():
                shutil.copy2(item, staging / item.name)
        specs = dict(base.manifest.parts)
        counts = {}
        for name, spec in specs.items():
            target = staging / spec.file
            counts[name] = emulate_graph(base.part_path(name), target, set(spec.fp32_layers))
            digest = sha256_file(target)
            # Other numbers, other identity: caches must never mix emulated and fp32 embeddings.
            specs[name] = replace(spec, sha256=digest, weights_sha256=f"fp16emu:{digest}")
        manifest = replace(
            base.manifest, name=f"{base.manifest.name}-fp16emu", parts=specs,
            export={**base.manifest.export, "quantization": {
                "method": METHOD, "kind": "fp16-emulation", "parts": list(specs), "cpu_only": True,
                "source_bundle": base.manifest.name, "counts": counts}},
        )
        write_manifest(staging, manifest)
        commit_directory(staging, out)
        return manifest
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
