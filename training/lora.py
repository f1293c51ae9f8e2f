"""Teach the base shapes model the held-out shape ``star`` with a LoRA adapter (PEFT).

Targets: every attention projection and MLP of the DETR encoder, the DETR decoder and the mask
decoder's prompt cross-attention, rank 8. Decoder-only (SAM3-LoRA's minimal config) is not
enough here: the DETR *encoder* is where the text meets the image, and a concept the model has
never seen has to be fused there. The image and text encoders stay frozen and shared with the
base (same weight hashes, one embedding cache). Training scenes hold all four shapes (a star
in every scene) and prompts from the full vocabulary, so the base concepts are rehearsed while
the new one is learnt.

Written twice, from the same tensors: a PEFT directory (``peft/``) and SAM3-LoRA's ``.pt``
(Meta module names, ``lora_A`` [in, r] / ``lora_B`` [r, out]; q/k/v of Meta's fused attention
as ``q_proj``/``k_proj``/``v_proj``) with its YAML. Both merge to the same weights.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from export.model_card import ADAPTER_CARD
from scenes.generator import ALL_SHAPES, HELD_OUT_SHAPES, vocabulary
from training.data import DataOptions
from training.losses import LossWeights
from training.trainer import Device, TrainConfig, train

LORA_TARGET_PREFIXES = ("detr_encoder.layers.", "detr_decoder.layers.", "mask_decoder.prompt_cross_attn.")
LORA_TARGET_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
PEFT_DIR = "peft"
META_FILE = "best_lora_weights.pt"
META_YAML = "lora_config.yaml"


def lora_targets(model) -> list[str]:
    return sorted(
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith(LORA_TARGET_PREFIXES)
        and name.rsplit(".", 1)[-1] in LORA_TARGET_LEAVES
    )


def train_lora(base: Path, out: Path, *, steps: int, seed: int, resume: bool, rank: int, alpha: float,
               lr: float, hard_negative_share: float = 0.0, presence_gated_cls: bool = False,
               threads: int = 1, device: Device = Device()) -> None:
    from peft import LoraConfig, get_peft_model

    from export.checkpoints import load_checkpoint
    from training.base import MODEL_CARD, model_dims

    model = load_checkpoint(base).model
    image_size, mask_size = model_dims(model)
    torch.manual_seed(seed)
    peft_config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=lora_targets(model))
    peft_model = get_peft_model(model, peft_config)
    data = DataOptions(image_size=image_size, mask_size=mask_size, seed=seed, shapes=ALL_SHAPES,
                       require_shape=HELD_OUT_SHAPES[0], hard_negative_share=hard_negative_share)
    weights = LossWeights(presence_gated_cls=presence_gated_cls)
    config = TrainConfig(steps=steps, lr=lr, warmup=50, weight_decay=0.0, threads=threads)
    work = out.with_name(out.name + ".work")
    train(peft_model, peft_model.parameters(), config, data, work, resume=resume, sam3=model, weights=weights,
          device=device)
    peft_model.cpu()

    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write_adapter(staging, peft_model, model, rank=rank, alpha=alpha,
                  training_yaml=f"training:\n  steps: {steps}\n  learning_rate: {lr:g}\n  seed: {seed}\n")
    base_card = json.loads((base / MODEL_CARD).read_text()) if (base / MODEL_CARD).is_file() else {}
    card = {
        "name": "sam3-shapes-star-lora",
        "description": "LoRA adapter for the shapes model that teaches the held-out shape 'star'.",
        "base": base_card.get("name", base.name),
        "vocabulary": vocabulary(ALL_SHAPES),
        "trained_with": {"command": f"python -m training lora --base {base} --out {out} --steps {steps} "
                                    f"--rank {rank} --alpha {alpha:g} --seed {seed}"
                                    + (f" --hard-negatives {hard_negative_share}" if hard_negative_share else "")
                                    + (" --presence-gated-cls" if presence_gated_cls else ""),
                         "train_config": asdict(config), "data": asdict(data), "loss": asdict(weights),
                         "device": asdict(device),
                         "targets": peft_config.target_modules and sorted(peft_config.target_modules)},
    }
    for where in (staging, staging / PEFT_DIR):  # beside the .pt, and inside the PEFT directory
        (where / ADAPTER_CARD).write_text(json.dumps(card, indent=2) + "\n")
    if (work / "train_log.jsonl").is_file():
        shutil.copy(work / "train_log.jsonl", staging / "train_log.jsonl")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    print(f"wrote {out}")


def write_adapter(directory: Path, peft_model, model, *, rank: int, alpha: float, training_yaml: str = "") -> None:
    """The same adapter twice: ``peft/`` (PEFT) and ``best_lora_weights.pt`` + YAML (SAM3-LoRA)."""
    peft_model.save_pretrained(directory / PEFT_DIR)
    lora_sd = {k: v for k, v in peft_model.state_dict().items() if ".lora_" in k}
    torch.save(peft_to_meta_lora(model, lora_sd), directory / META_FILE)
    (directory / META_YAML).write_text(
        "# SAM3-LoRA training config layout (configs/*.yaml); the exporter reads lora.rank/alpha\n"
        f"lora:\n  rank: {rank}\n  alpha: {alpha:g}\n  dropout: 0.0\n"
        "  target_modules: [q_proj, k_proj, v_proj, out_proj, linear1, linear2]\n"
        "  apply_to_vision_encoder: false\n  apply_to_text_encoder: false\n"
        "  apply_to_geometry_encoder: false\n  apply_to_detr_encoder: true\n  apply_to_detr_decoder: true\n"
        "  apply_to_mask_decoder: true\n" + training_yaml)


def peft_to_meta_lora(model, lora_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT tensors (transformers names, A [r, in], B [out, r]) -> SAM3-LoRA ``.pt`` keys and layout."""
    from export.checkpoints import hf_to_meta_state_dict

    weights = {k: v for k, v in model.state_dict().items() if k.endswith(".weight")}
    out: dict[str, torch.Tensor] = {}
    for key, a in lora_sd.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        module = module.replace(".base_layer", "")
        b = lora_sd[key.replace(".lora_A.", ".lora_B.")]
        parent, _, leaf = module.rpartition(".")
        if leaf in ("q_proj", "k_proj", "v_proj"):
            siblings = {f"{parent}.{p}.weight": _base_weight(weights, f"{parent}.{p}") for p in ("q_proj", "k_proj", "v_proj")}
            (fused,) = hf_to_meta_state_dict(siblings, model.config)
            meta_module = f"{fused.rsplit('.', 1)[0]}.{leaf}" if fused.endswith("in_proj_weight") else \
                f"{fused.rsplit('.', 2)[0]}.{leaf}"
        else:
            (meta_key,) = hf_to_meta_state_dict({f"{module}.weight": _base_weight(weights, module)}, model.config)
            meta_module = meta_key.removesuffix(".weight")
        out[f"{meta_module}.lora.lora_A"] = a.detach().t().contiguous().clone()
        out[f"{meta_module}.lora.lora_B"] = b.detach().t().contiguous().clone()
    return out


def _base_weight(weights: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    for key in (f"{module}.weight", f"{module}.base_layer.weight"):
        for prefix in ("", "base_model.model."):
            if prefix + key in weights:
                return weights[prefix + key]
    raise KeyError(f"no base weight for {module}")
