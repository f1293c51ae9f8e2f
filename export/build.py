"""checkpoint -> merged model -> ONNX graphs (three, plus two for box prompts) -> verified, self-describing bundle.

Everything is written into a staging directory beside the target and renamed into place
only after verification passed, so a failed or interrupted build never leaves a
half-written bundle (and never clobbers a good one).
"""

from __future__ import annotations

import copy
import logging
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from engines.bundle import (
    Manifest,
    ModelInfo,
    PartSpec,
    Preprocessing,
    SourceInfo,
    TokenizerInfo,
    commit_directory,
    sha256_file,
    staging_directory,
    write_manifest,
)
from export import onnx_export, verify
from export.model_config import UnsupportedConfig, check_exportable, fpn_names, kept_fpn_sizes
from export.part_weights import PARTS, part_parameter_count, part_weights_sha256
from export.split import split_model

_log = logging.getLogger(__name__)

DEFAULT_PROMPTS: tuple[tuple[str, ...], ...] = (
    ("person",),
    ("a cup of coffee", "spoon", "table", "saucer"),
    ("cat",),
    ("a photo of a cat", "dog"),
)
DEFAULT_DECODER_MAX_BATCH = 8
# Decoder activations grow with the mask resolution: at 1008 px (288x288 masks) one prompt costs
# ~1 GB in fp32 (measured on ONNX Runtime CPU: 8 prompts in one call added 8.1 GB of RSS and ran
# 1.1x slower than 8 single calls). A batch-8 profile would not fit an 8 GB Orin Nano next to the
# engines, so large-mask models default to 2 prompts per call; the pipeline chunks the rest.
LARGE_MASK_PIXELS = 144 * 144
LARGE_MASK_DECODER_MAX_BATCH = 2
# Boxes per exemplar prompt the graphs take (padded). The runtime refuses more; 16 is far more
# than a user draws, and the geometry encoder's cost grows with it only slightly (K+1 tokens).
DEFAULT_MAX_BOXES = 16


def default_decoder_max_batch(config) -> int:
    """Prompts per decoder call for this model shape (8 up to SAM3-Small's 72x72 masks, 2 at 288x288)."""
    height, width = kept_fpn_sizes(config)[0]
    return LARGE_MASK_DECODER_MAX_BATCH if height * width > LARGE_MASK_PIXELS else DEFAULT_DECODER_MAX_BATCH


class BuildError(RuntimeError):
    """A build step failed; the message is the one-line reason shown to the user."""


@dataclass
class BuildOptions:
    name: str
    source: SourceInfo
    bounds: verify.ParityBounds = field(default_factory=verify.ParityBounds)
    decoder_max_batch: int | None = None  # None: default_decoder_max_batch(model.config)
    prompts: Sequence[Sequence[str]] = DEFAULT_PROMPTS
    fp16_check: bool = True
    fp16_error_run: bool = True  # also run a half-precision copy on CPU (slow at full size)
    max_cases: int | None = None  # end-to-end cases to verify (None: all sample photos)
    progress: Callable[[str], None] = lambda stage: None
    card: dict[str, Any] = field(default_factory=dict)  # model card for the manifest (see model_card.py)
    # Exemplar (box) prompts: the geometry-encoder and exemplar-decoder graphs take this many
    # boxes per prompt (padded); 0 leaves them out and the bundle serves text prompts only.
    max_boxes: int = DEFAULT_MAX_BOXES


def model_info(model) -> ModelInfo:
    config = model.config
    vision = config.vision_config
    mask_h, mask_w = kept_fpn_sizes(config)[0]  # the masks come out at the finest level
    return ModelInfo(
        architecture="sam3",
        image_size=int(vision.image_size),
        patch_size=int(vision.backbone_config.patch_size),
        hidden_size=int(config.detr_encoder_config.hidden_size),
        num_queries=int(config.detr_decoder_config.num_queries),
        mask_size=(int(mask_h), int(mask_w)),
        parameters={part: part_parameter_count(model, part) for part in PARTS},
        config=config.to_dict(),
    )


def build_bundle(model, out: Path, options: BuildOptions) -> Manifest:
    """Export, verify and atomically write the bundle for an in-memory ``Sam3Model``."""
    from engines.preprocess import to_pixel_values
    from engines.tokenizer import PromptTokenizer
    from export.tokenizer import write_tokenizer_json

    model.eval()
    try:  # before any work: a config the graphs cannot represent is refused with the reason
        config_notes = check_exportable(model.config)
    except UnsupportedConfig as exc:
        raise BuildError(f"cannot export this SAM3 config: {exc}") from None
    out = Path(out)
    staging = staging_directory(out)
    timings: dict[str, float] = {}
    try:
        options.progress("tokenizer")
        tokenizer_info = TokenizerInfo(**write_tokenizer_json(staging / "tokenizer.json"))
        preprocessing = Preprocessing(image_size=int(model.config.vision_config.image_size))

        parts = split_model(model, exemplars=options.max_boxes > 0)
        paths = {name: staging / f"{name}.onnx" for name in parts}
        examples = {name: onnx_export.example_inputs(name, model, max_boxes=options.max_boxes) for name in parts}
        for name, module in parts.items():
            options.progress(f"export {name}")
            started = time.perf_counter()
            onnx_export.export_part(name, module, examples[name], paths[name])
            timings[f"export_{name}_s"] = round(time.perf_counter() - started, 2)

        options.progress("verify parity")
        started = time.perf_counter()
        tokenizer = PromptTokenizer(staging / "tokenizer.json", tokenizer_info)
        photos = verify.sample_photos()
        if options.max_cases is not None:
            photos = dict(list(photos.items())[: max(1, options.max_cases)])
        cases = verify.build_cases(photos, lambda px: to_pixel_values(px, preprocessing),
                                   tokenizer.encode, options.prompts)
        exemplar_cases = (verify.build_exemplar_cases(cases[0].pixel_values, tokenizer.encode, options.max_boxes)
                          if options.max_boxes > 0 else [])
        part_inputs = _verification_inputs(parts, cases, exemplar_cases)
        # One session per graph for both checks: at full size each holds ~2 GB of weights.
        sessions = {name: verify.ort_session(path) for name, path in paths.items()}
        parity_parts = verify.part_parity(parts, sessions, part_inputs)
        e2e = verify.end_to_end_parity(model, sessions, cases)
        exemplar_e2e = verify.exemplar_parity(model, sessions, exemplar_cases) if exemplar_cases else {}
        del sessions
        summary = verify.summarize(e2e)
        timings["verify_s"] = round(time.perf_counter() - started, 2)
        verify.check_bounds(summary, options.bounds)
        parity: dict[str, Any] = {"bounds": vars(options.bounds), "summary": summary, "parts": parity_parts,
                                  "end_to_end": e2e}
        if exemplar_e2e:
            parity["exemplars"] = {"summary": verify.summarize(exemplar_e2e), "end_to_end": exemplar_e2e}
            verify.check_bounds(parity["exemplars"]["summary"], options.bounds)

        options.progress("op audit")
        audit = verify.op_audit(paths)
        fp16: dict[str, Any] = {}
        if options.fp16_check:
            options.progress("fp16 range")
            started = time.perf_counter()
            # one half-precision copy of the whole model serves every part
            half_parts = (split_model(copy.deepcopy(model).half(), exemplars=options.max_boxes > 0)
                          if options.fp16_error_run else None)
            fp16 = verify.fp16_range(parts, paths, part_inputs, half_parts)
            del half_parts
            timings["fp16_check_s"] = round(time.perf_counter() - started, 2)
        pinned = verify.fp32_layers(fp16) if fp16 else {}

        decoder_max_batch = options.decoder_max_batch or default_decoder_max_batch(model.config)
        specs = {}
        for name in parts:
            inputs, outputs = onnx_export.tensor_specs(paths[name])
            spec = PartSpec(
                name=name,
                file=paths[name].name,
                sha256=sha256_file(paths[name]),
                weights_sha256=part_weights_sha256(model, name),
                inputs=inputs,
                outputs=outputs,
                fp32_layers=tuple(pinned.get(name, ())),
                external_data=onnx_export.external_data_files(paths[name]),
                # prompts are batched through the text encoder and the decoders alike
                max_batch=1 if name == "image_encoder" else decoder_max_batch,
            )
            onnx_export.check_contract(spec, fpn_names(model.config))
            specs[name] = spec

        manifest = Manifest(
            name=options.name,
            model=model_info(model),
            preprocessing=preprocessing,
            tokenizer=tokenizer_info,
            parts=specs,
            source=options.source,
            parity=parity,
            fp16_range=fp16,
            op_audit=audit,
            export=_export_info(timings, config_notes),
            card=options.card,
        )
        write_manifest(staging, manifest)
        options.progress("commit")
        commit_directory(staging, out)
        return manifest
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _verification_inputs(parts: dict[str, nn.Module], cases: Sequence[verify.PromptCase],
                         exemplar_cases: Sequence[verify.ExemplarCase] = ()) -> dict[str, tuple]:
    """Per-part inputs from the first real photo (decoders fed the real encoder outputs)."""
    case = max(cases, key=lambda c: c.input_ids.shape[0])
    with torch.no_grad():
        image = parts["image_encoder"](case.pixel_values)
        text = parts["text_encoder"](case.input_ids, case.attention_mask)
    inputs = {
        "image_encoder": (case.pixel_values,),
        "text_encoder": (case.input_ids, case.attention_mask),
        "decoder": (*image, text, case.attention_mask),
    }
    if exemplar_cases and "geometry_encoder" in parts:
        # two prompts in one batch (three boxes without text; a negative box with text): at full
        # size one prompt costs ~1 GB of decoder activations
        picked = [exemplar_cases[1], exemplar_cases[-1]]
        ids = torch.cat([c.input_ids for c in picked])
        mask = torch.cat([c.attention_mask for c in picked])
        boxes = torch.cat([c.boxes for c in picked])
        labels = torch.cat([c.labels for c in picked])
        with torch.no_grad():
            *levels, _cls = parts["image_encoder"](exemplar_cases[0].pixel_values)
            text = parts["text_encoder"](ids, mask)
            geometry = parts["geometry_encoder"](levels[-1], boxes, labels)
        inputs["geometry_encoder"] = (levels[-1], boxes, labels)
        inputs["exemplar_decoder"] = (*levels, text, mask, *geometry)
    return inputs


def _export_info(timings: dict[str, float], config_notes: Sequence[str] = ()) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import transformers

    return {
        "exporter": "torch.onnx.export(dynamo=True)",
        "opset": onnx_export.OPSET,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "timings": timings,
        # What the exporter ignored or derived in the model's config (export/model_config.py).
        "config_notes": list(config_notes),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
