"""The PyTorch reference timed in the same run: transformers ``Sam3Model`` (eager attention)
on the same weights as the bundle, with Meta's semantics (``export.split.reference_forward``:
one padding box, so the geometry CLS token is part of the prompt).

Imported only when ``--reference-checkpoint`` is given, so ``python -m benchmarks pipeline``
runs on a torch-free Jetson. The image is encoded once per call and broadcast over the
prompt batch (what a careful transformers user does; the 1994 ms planning baseline is this),
not once per prompt as ``reference_forward`` with a batched ``pixel_values`` would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.stats import summarize
from export.checkpoints import load_checkpoint
from export.split import reference_forward


@dataclass
class ReferenceInputs:
    """Exactly what our pipeline fed its graphs (same preprocessing, same token ids)."""

    pixel_values: np.ndarray  # [1, 3, S, S] float32
    input_ids: np.ndarray  # [N, L]
    attention_mask: np.ndarray  # [N, L]


class Reference:
    """Timed reference paths mirroring the pipeline benchmark's cold / warm / text-cached."""

    def __init__(self, checkpoint: str | Path) -> None:
        loaded = load_checkpoint(checkpoint)
        self.model = loaded.model.eval()
        self.model.config._attn_implementation = "eager"
        self.checkpoint = str(checkpoint)
        self.format = loaded.format

    def _prompt_kwargs(self, batch: int) -> dict[str, torch.Tensor]:
        return {
            "input_boxes": torch.zeros(batch, 1, 4),
            "input_boxes_labels": torch.full((batch, 1), -10, dtype=torch.long),
        }

    @torch.inference_mode()
    def cold(self, inputs: ReferenceInputs) -> dict[str, torch.Tensor]:
        pixel = torch.from_numpy(inputs.pixel_values)
        ids, mask = torch.from_numpy(inputs.input_ids).long(), torch.from_numpy(inputs.attention_mask).long()
        vision = _broadcast(self.model.get_vision_features(pixel_values=pixel), ids.shape[0])
        return self._outputs(self.model(vision_embeds=vision, input_ids=ids, attention_mask=mask,
                                        **self._prompt_kwargs(ids.shape[0])))

    @torch.inference_mode()
    def timed_paths(
        self, inputs: ReferenceInputs, ours: dict[str, Callable[[], Any]], iterations: int, warmup: int
    ) -> dict[str, Any]:
        """Reference and ours, interleaved call by call, per path.

        On a shared machine the load changes within seconds; alternating the two (and which
        goes first) gives both the same conditions, so their ratio is meaningful even when
        the absolute numbers move. The vision/text embeddings are computed once, outside.
        """
        pixel = torch.from_numpy(inputs.pixel_values)
        ids, mask = torch.from_numpy(inputs.input_ids).long(), torch.from_numpy(inputs.attention_mask).long()
        batch = ids.shape[0]
        vision = _broadcast(self.model.get_vision_features(pixel_values=pixel), batch)
        text = self.model.get_text_features(input_ids=ids, attention_mask=mask, return_dict=True)
        boxes = self._prompt_kwargs(batch)
        paths: dict[str, Callable[[], Any]] = {
            "cold": lambda: self.cold(inputs),
            "warm": lambda: self.model(vision_embeds=vision, input_ids=ids, attention_mask=mask, **boxes),
            "text_cached": lambda: self.model(vision_embeds=vision, text_embeds=text, attention_mask=mask, **boxes),
        }
        out = {}
        for name, run in paths.items():
            ref_ms, ours_ms = [], []
            for i in range(warmup + iterations):
                pair = [(run, ref_ms), (ours[name], ours_ms)]
                for fn, samples in pair if i % 2 == 0 else pair[::-1]:
                    started = time.perf_counter()
                    fn()
                    if i >= warmup:
                        samples.append((time.perf_counter() - started) * 1e3)
            out[name] = {"end_to_end": summarize(ref_ms), "ours_interleaved": summarize(ours_ms)}
        return out

    @torch.inference_mode()
    def flops(self, inputs: ReferenceInputs) -> dict[str, float]:
        """GFLOP per call for the run's prompt batch N (torch FlopCounterMode), and the floors.

        Vision runs once per image, text and decoder once per prompt (the decoder broadcasts
        the image), so the floors depend on N. With V, T, D the GFLOP of each part:
        warm/cold >= (T + D) / (V + T + D) (text re-encoded) and text-cached/cold >= D / (V + T + D),
        the performance goals' definitions (at N = 1: 0.151 and 0.128 for the SAM3-Small shape).
        """
        pixel = torch.from_numpy(inputs.pixel_values)
        ids, mask = torch.from_numpy(inputs.input_ids).long(), torch.from_numpy(inputs.attention_mask).long()
        batch = ids.shape[0]
        counted: dict[str, float] = {}
        with FlopCounterMode(display=False) as counter:
            vision = self.model.get_vision_features(pixel_values=pixel)
        counted["vision"] = counter.get_total_flops() / 1e9
        with FlopCounterMode(display=False) as counter:
            text = self.model.get_text_features(input_ids=ids, attention_mask=mask, return_dict=True)
        counted["text"] = counter.get_total_flops() / 1e9
        with FlopCounterMode(display=False) as counter:
            self.model(vision_embeds=_broadcast(vision, batch), text_embeds=text, attention_mask=mask,
                       **self._prompt_kwargs(batch))
        counted["decoder"] = counter.get_total_flops() / 1e9
        total = counted["vision"] + counted["text"] + counted["decoder"]
        return {
            "prompts": batch,
            "vision_gflop": round(counted["vision"], 3),
            "text_gflop": round(counted["text"], 3),
            "decoder_gflop": round(counted["decoder"], 3),
            "floor_warm_over_cold": round((counted["text"] + counted["decoder"]) / total, 4),
            "floor_text_cached_over_cold": round(counted["decoder"] / total, 4),
        }

    @torch.inference_mode()
    def check_same_semantics(self, inputs: ReferenceInputs) -> float:
        """max |logit| difference between our timed cold path and ``reference_forward``.

        Guards the timing: a faster reference that computed something else would be no reference.
        """
        ours = self.cold(inputs)
        ids, mask = torch.from_numpy(inputs.input_ids).long(), torch.from_numpy(inputs.attention_mask).long()
        ref = reference_forward(self.model, torch.from_numpy(inputs.pixel_values), ids, mask)
        return float((ours["pred_logits"] - ref["pred_logits"]).abs().max())

    @staticmethod
    def _outputs(out: Any) -> dict[str, torch.Tensor]:
        return {"pred_masks": out.pred_masks, "pred_boxes": out.pred_boxes,
                "pred_logits": out.pred_logits, "presence_logits": out.presence_logits}

    def describe(self) -> dict[str, Any]:
        return {
            "implementation": "transformers Sam3Model, eager attention, fp32, torch CPU",
            "checkpoint": Path(self.checkpoint).name,
            "format": self.format,
            "torch_threads": torch.get_num_threads(),
        }


def _broadcast(vision: Any, batch: int) -> Any:
    """Sam3VisionEncoderOutput for one image -> the same tensors viewed at batch N (no copy)."""
    if batch == 1:
        return vision
    fields = {}
    for key, value in vision.items():
        if isinstance(value, torch.Tensor):
            fields[key] = value.expand(batch, *value.shape[1:])
        elif isinstance(value, (tuple, list)):
            fields[key] = type(value)(v.expand(batch, *v.shape[1:]) for v in value)
        else:
            fields[key] = value
    return type(vision)(**fields)
