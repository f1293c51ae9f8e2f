"""Opt-in int8 CPU mode: an ONNX Runtime dynamic-int8 copy of a bundle, with its parity loss measured.

On a CPU the image encoder dominates a cold request (SAM3-Small shape: ~300 of ~400 ms). Dynamic
int8 quantization of its MatMul weights (per-tensor int8 weights, activations quantized at run
time) ran it 2.1x faster on our AVX512-VNNI CPU (266 -> 130 ms). It changes the answers, so
it is never the default: ``python -m export quantize`` writes a *separate* bundle whose manifest
records the int8-vs-fp32 error on the same sample photos the export verifies with, and marks it
CPU-only (TensorRT's ONNX parser has no MatMulInteger; the Jetson path uses FP16 engines built
from the fp32 bundle instead).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from engines.bundle import Bundle, Manifest, commit_directory, sha256_file, staging_directory, write_manifest
from engines.preprocess import to_pixel_values
from engines.tokenizer import PromptTokenizer
from export import verify

QUANTIZABLE = ("image_encoder", "text_encoder", "decoder")
DEFAULT_PARTS = ("image_encoder",)  # the cold path's cost; the decoder's masks are the most sensitive
METHOD = "onnxruntime.quantization.quantize_dynamic: int8 MatMul weights (constant B only), dynamic activations"


def quantize_bundle(source: Path, out: Path, parts: Sequence[str] = DEFAULT_PARTS,
                    prompts: Sequence[Sequence[str]] | None = None) -> Manifest:
    """Write an int8 copy of ``source`` at ``out`` (atomically) and return its manifest."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    unknown = sorted(set(parts) - set(QUANTIZABLE))
    if unknown or not parts:
        raise ValueError(f"parts to quantize must be among {', '.join(QUANTIZABLE)}; got {list(parts)}")
    base = Bundle(source)
    if base.manifest.export.get("quantization"):
        raise ValueError(f"{source} is already quantized; quantize the fp32 bundle it came from")
    staging = staging_directory(out)
    try:
        for item in base.root.iterdir():
            if item.is_file():
                shutil.copy2(item, staging / item.name)
        specs = dict(base.manifest.parts)
        for name in parts:
            spec = specs[name]
            target = staging / spec.file
            target.unlink()
            quantize_dynamic(str(base.part_path(name)), str(target), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul"], extra_options={"MatMulConstBOnly": True})
            digest = sha256_file(target)
            # New weights, new identity: caches must never mix int8 and fp32 embeddings.
            specs[name] = replace(spec, sha256=digest, weights_sha256=f"int8:{digest}", fp32_layers=())
        paths = {name: staging / spec.file for name, spec in specs.items()}
        parity = _int8_vs_fp32(base, paths, prompts)
        manifest = replace(
            base.manifest,
            name=f"{base.manifest.name}-int8",
            parts=specs,
            parity={**base.manifest.parity, "int8_vs_fp32": parity},
            op_audit=verify.op_audit(paths),
            export={**base.manifest.export, "quantization": {
                "method": METHOD, "parts": list(parts), "cpu_only": True,
                "source_bundle": base.manifest.name, "parity_vs_fp32": parity["summary"]}},
        )
        write_manifest(staging, manifest)
        commit_directory(staging, out)
        return manifest
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _int8_vs_fp32(base: Bundle, int8_paths: dict[str, Path], prompts: Sequence[Sequence[str]] | None) -> dict:
    """Both bundles through the same ORT chain on the export's sample photos and prompts."""
    from export.build import DEFAULT_PROMPTS

    tokenizer = PromptTokenizer.from_bundle(base)
    cases = verify.build_cases(verify.sample_photos(),
                               lambda px: to_pixel_values(px, base.manifest.preprocessing),
                               tokenizer.encode, prompts or DEFAULT_PROMPTS)
    fp32 = {name: verify.ort_session(base.part_path(name)) for name in int8_paths}
    int8 = {name: verify.ort_session(path) for name, path in int8_paths.items()}
    report = {}
    for case in cases:
        ref, got = verify.run_chain(fp32, case), verify.run_chain(int8, case)
        entry = {name: verify.max_errors(got[name], ref[name]) for name in ref}
        entry["mask_iou"] = verify.mask_iou(got["pred_masks"], ref["pred_masks"])
        entry["same_top_query"] = bool((got["pred_logits"].argmax(-1) == ref["pred_logits"].argmax(-1)).all())
        report[case.name] = entry
    return {"summary": verify.summarize(report), "cases": report}

