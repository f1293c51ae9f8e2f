"""The PyTorch model as a segmenter for the accuracy command (needs torch; workstation only).

transformers' ``Sam3Model`` with Meta's semantics (``export.split.reference_forward``), fed by
the runtime's own image decoding, preprocessing and tokenizer, and answered through the
runtime's post-processing, so PyTorch and bundle differ only in where the graphs run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from benchmarks.accuracy import AccuracyConfig, Segmenter
from engines.bundle import Preprocessing, TokenizerInfo
from engines.options import SegmentOptions
from engines.postprocess import postprocess, result_document
from engines.preprocess import load_image, to_pixel_values
from engines.tokenizer import PromptTokenizer
from engines.types import PromptResult


def torch_segmenter(checkpoint: str | Path, loras: Sequence[str | Path] = (), *, lora_alpha: float | None = None,
                    lora_config: str | None = None,
                    config: AccuracyConfig = AccuracyConfig()) -> tuple[Segmenter, dict[str, Any]]:
    from export.checkpoints import load_checkpoint
    from export.lora import LoraOptions, merge_adapters
    from export.split import reference_forward
    from export.tokenizer import write_tokenizer_json

    options = LoraOptions(rank=None, alpha=lora_alpha, config=lora_config)
    loaded = load_checkpoint(checkpoint, lora=options)
    model = loaded.model
    if loras:
        model, _ = merge_adapters(model, [str(p) for p in loras], options, checkpoint_format=loaded.format)
    model.eval()
    size = int(model.config.vision_config.backbone_config.image_size)
    prep = Preprocessing(image_size=size)
    tok_dir = Path(tempfile.mkdtemp(prefix="sam3-acc-tok-"))
    info = TokenizerInfo(**write_tokenizer_json(tok_dir / "tokenizer.json"))
    tokenizer = PromptTokenizer(tok_dir / "tokenizer.json", info, max_prompts=None)

    options = SegmentOptions(score_threshold=config.ap_score_floor, max_detections=config.max_detections)

    @torch.inference_mode()
    def segment(image: bytes, prompts: list[str]) -> dict[str, Any]:
        loaded_image = load_image(image)
        pixels = torch.from_numpy(to_pixel_values(loaded_image.pixels, prep))
        ids, mask = tokenizer.encode(prompts)
        out = reference_forward(model, pixels, torch.from_numpy(ids), torch.from_numpy(mask))
        results = []
        for i, prompt in enumerate(prompts):
            detections = postprocess(
                out["pred_masks"][i].numpy(), out["pred_boxes"][i].numpy(), out["pred_logits"][i].numpy(),
                float(np.asarray(out["presence_logits"][i]).reshape(-1)[0]),
                original_size=(loaded_image.height, loaded_image.width),
                options=options)
            results.append(PromptResult(prompt=prompt, detections=tuple(detections)))
        return result_document((loaded_image.width, loaded_image.height), results, "rle")

    return segment, {"kind": "pytorch", "checkpoint": str(checkpoint), "loras": [str(p) for p in loras],
                     "name": f"{Path(checkpoint).name} (PyTorch, transformers Sam3Model)", "precision": "fp32",
                     "backend": "pytorch"}
