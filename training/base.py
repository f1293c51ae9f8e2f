"""Train the shapes demo model from scratch and write it as a real HF checkpoint.

The model is transformers' ``Sam3Model`` at the ``shapes`` preset's dims; the output directory
holds ``config.json`` + ``model.safetensors`` (fp16: half the bytes in git, and the exporter
loads it back as fp32) + ``model_card.json`` (vocabulary, how it was trained), which the
exporter copies into the bundle manifest, + the loss log.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from scenes.generator import BASE_SHAPES, COLOURS, vocabulary
from training.data import DISTRACTORS, DataOptions
from training.losses import LossWeights
from training.trainer import Device, TrainConfig, train

PRESET = "shapes"
MODEL_CARD = "model_card.json"


TOKEN_EMBEDDING_STD = 0.3
# The text side every stage keeps at its seeded init (see new_model); a fine-tune may free the projection.
FROZEN_TEXT = ("text_encoder.", "text_projection.")
# ~ an orthogonal map (1/sqrt(width)): projected words come out as large as the geometry CLS token
# they sit beside in the prompt (norm ~8); at transformers' init (0.02) they were 1.2 vs 8.
TEXT_PROJECTION_STD = 0.125


def new_model(seed: int):
    """A fresh model with transformers' init, except for the token embeddings (std 0.3).

    Why the text side is special (measured): with CLIP's init (std 0.02) and the text encoder
    trained from scratch, "red circle" and "blue circle" came out of it with per-token cosine
    similarity 0.999 and after 500 steps the detector still ignored the prompt (presence loss
    stuck at ln 2). Larger token embeddings alone were not enough: training pulled the words
    together again (cosine 0.72 at init -> 0.97 after 250 steps). Freezing the text side alone
    was not enough either: at transformers' init the projected words have norm ~1.2 beside the
    geometry CLS token's ~8, so image tokens attended to the CLS token and the prompt changed the
    DETR encoder's output by 2 % (red vs blue circle; 14 % with the projection below). So the
    words get distinct embeddings, the projection keeps their size, and the text encoder +
    projection stay frozen at this seeded init (random features keep 20-odd words apart);
    everything after them learns to read those features.
    """
    from transformers import Sam3Model

    from export.presets import preset_config

    torch.manual_seed(seed)
    model = Sam3Model(preset_config(PRESET))
    embedding = model.text_encoder.text_model.embeddings.token_embedding
    torch.nn.init.normal_(embedding.weight, std=TOKEN_EMBEDDING_STD)
    torch.nn.init.normal_(model.text_projection.weight, std=TEXT_PROJECTION_STD)
    return model


def model_dims(model) -> tuple[int, int]:
    """(input size, mask size) of a Sam3Model."""
    backbone = model.config.vision_config.backbone_config
    return int(backbone.image_size), 4 * (backbone.image_size // backbone.patch_size)


def train_base(out: Path, *, steps: int, seed: int, resume: bool, images_per_step: int,
               prompts_per_image: int, lr: float, threads: int = 1, freeze_text: bool = True,
               device: Device = Device()) -> None:
    model = new_model(seed)
    image_size, mask_size = model_dims(model)
    data = DataOptions(image_size=image_size, mask_size=mask_size, images_per_step=images_per_step,
                       prompts_per_image=prompts_per_image, seed=seed)
    config = TrainConfig(steps=steps, lr=lr, threads=threads)
    work = out.with_name(out.name + ".work")
    frozen = FROZEN_TEXT if freeze_text else ()
    for name, param in model.named_parameters():
        param.requires_grad_(not (frozen and name.startswith(frozen)))
    params = [p for p in model.parameters() if p.requires_grad]
    train(model, params, config, data, work, resume=resume, device=device)
    card = {
        "name": "sam3-shapes",
        "description": "SAM3 architecture at small dims trained from scratch on generated scenes of coloured "
                       "shapes (scenes/generator.py). It knows the vocabulary below and nothing else.",
        "random_weights": False,
        "vocabulary": vocabulary(BASE_SHAPES),
        "colours": list(COLOURS),
        "shapes": list(BASE_SHAPES),
        "trained_with": {"command": f"python -m training base --out {out} --steps {steps} --seed {seed}"
                                    + ("" if freeze_text else " --train-text-encoder")
                                    + ("" if device.name == "cpu" else f" --device {device.name}"),
                         "train_config": asdict(config), "data": asdict(data), "loss": asdict(LossWeights()),
                         "device": asdict(device),
                         "distractor_prompts": len(DISTRACTORS), "frozen_at_init": list(frozen),
                         "token_embedding_std": TOKEN_EMBEDDING_STD, "text_projection_std": TEXT_PROJECTION_STD},
    }
    write_checkpoint(model, out, card, work / "train_log.jsonl")


def write_checkpoint(model, out: Path, card: dict, log: Path, extra_files: Sequence[Path] = ()) -> None:
    """config.json + fp16 model.safetensors + model card + loss log (+ ``extra_files`` that
    exist, e.g. earlier stages' logs), written then renamed."""
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    model.cpu().eval().to(torch.float16).save_pretrained(staging)
    model.to(torch.float32)
    (staging / MODEL_CARD).write_text(json.dumps(card, indent=2) + "\n")
    if log.is_file():
        shutil.copy(log, staging / "train_log.jsonl")
    for extra in extra_files:
        if extra.is_file():
            shutil.copy(extra, staging / extra.name)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    print(f"wrote {out}")


@dataclass(frozen=True)
class ExemplarStage:
    """One fine-tuning stage's recipe: the CLI's defaults, the run's data and loss options, and
    the command that reproduces it (written to the model card) all come from these fields.

    ``hard_negative_share`` of the absent prompts name a near miss of an object in the image;
    ``train_text_projection`` lets the linear map after the frozen text encoder learn (it is part
    of the exported text graph, so nothing changes for the runtime).
    ``presence_gated_cls`` is Meta's objective: no query classification loss on absent prompts;
    ``presence_weight`` weighs the presence token's loss; ``colour_distractor_share`` of the
    unknown-word prompts pair a known colour with an unknown word; ``shape_prompt_share`` of the
    present prompts name a shape alone (the one with the most objects).
    """

    steps: int = 400
    lr: float = 1.5e-4
    seed: int = 2
    exemplar_share: float = 0.5
    aux_copies: int = 3
    hard_negative_share: float = 0.0
    prompts_per_image: int = 4
    images_per_step: int = 8
    train_text_projection: bool = False
    presence_gated_cls: bool = False
    presence_weight: float = LossWeights.presence
    colour_distractor_share: float = 0.0
    shape_prompt_share: float = 0.0

    def data_options(self, image_size: int, mask_size: int) -> DataOptions:
        return DataOptions(image_size=image_size, mask_size=mask_size, seed=self.seed,
                           exemplar_share=self.exemplar_share, hard_negative_share=self.hard_negative_share,
                           prompts_per_image=self.prompts_per_image, images_per_step=self.images_per_step,
                           colour_distractor_share=self.colour_distractor_share,
                           shape_prompt_share=self.shape_prompt_share)

    def loss_weights(self) -> LossWeights:
        return LossWeights(aux_copies=self.aux_copies, presence_gated_cls=self.presence_gated_cls,
                           presence=self.presence_weight)

    def command(self, base: Path, out: Path, device: Device = Device()) -> str:
        """``python -m training exemplars ...`` for this stage; options at their defaults are
        left out but for the ones every stage states, and ``--out`` when it rewrites ``base``."""
        default = ExemplarStage()
        flags = [f"--base {base}"] + ([] if out == base else [f"--out {out}"]) + [
            f"--steps {self.steps}", f"--lr {self.lr}", f"--exemplar-share {self.exemplar_share}",
            f"--aux-copies {self.aux_copies}", f"--seed {self.seed}"]
        optional = [
            (self.hard_negative_share != default.hard_negative_share, f"--hard-negatives {self.hard_negative_share}"),
            (self.prompts_per_image != default.prompts_per_image, f"--prompts {self.prompts_per_image}"),
            (self.images_per_step != default.images_per_step, f"--images {self.images_per_step}"),
            (self.train_text_projection, "--train-text-projection"),
            (self.presence_gated_cls, "--presence-gated-cls"),
            (self.presence_weight != default.presence_weight, f"--presence-weight {self.presence_weight:g}"),
            (self.colour_distractor_share != default.colour_distractor_share,
             f"--colour-distractors {self.colour_distractor_share}"),
            (self.shape_prompt_share != default.shape_prompt_share, f"--shape-prompts {self.shape_prompt_share}"),
            (device.name != "cpu", f"--device {device.name}"),
        ]
        flags += [flag for wanted, flag in optional if wanted]
        return "python -m training exemplars " + " ".join(flags)


def finetune_exemplars(base: Path, out: Path, stage: ExemplarStage, *, resume: bool, threads: int = 1,
                       device: Device = Device()) -> None:
    """Teach a trained base model exemplar (box) prompts, keeping its text prompts.

    The base run trains the geometry encoder only through its CLS token (text-only prompts);
    here half of the present prompts also carry a box around one of their objects, and half of
    those drop the text ("visual": everything of the boxed object's colour and shape), as SAM3
    mixes text, exemplar and text+exemplar prompts. Every weight but the frozen text side learns,
    at a lower rate, on batches that still hold text-only and absent prompts.

    The intermediate decoder layers match each object to ``stage.aux_copies`` queries (the last
    layer one), for more positives per step in a short run. Stages stack: run on a model that
    already had one, this is stage 2 (its own work directory, loss log and entry in the model card).
    """
    from export.checkpoints import load_checkpoint

    card = json.loads((base / MODEL_CARD).read_text()) if (base / MODEL_CARD).is_file() else {}
    # Every stage run on this model, in order (a model card written before stages were a list has one).
    stages = card.pop("exemplar_fine_tunes", [])
    if "exemplar_fine_tune" in card:
        stages = [card.pop("exemplar_fine_tune")]
    number = len(stages) + 1
    suffix = "" if number == 1 else f"_{number}"
    model = load_checkpoint(base).model.float()
    image_size, mask_size = model_dims(model)
    data = stage.data_options(image_size, mask_size)
    config = TrainConfig(steps=stage.steps, lr=stage.lr, warmup=min(50, max(stage.steps // 10, 1)), threads=threads)
    frozen: tuple[str, ...] = ("text_encoder.",) if stage.train_text_projection else FROZEN_TEXT
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(frozen))
    work = out.with_name(out.name + f".exemplars{suffix}.work")
    weights = stage.loss_weights()
    train(model, [p for p in model.parameters() if p.requires_grad], config, data, work, resume=resume,
          weights=weights, device=device)
    card["exemplar_boxes"] = True
    log_name = f"train_log_exemplars{suffix}.jsonl"
    stages.append({
        "command": stage.command(base, out, device),
        "train_config": asdict(config), "data": asdict(data), "loss": asdict(weights), "frozen": list(frozen),
        "device": asdict(device),
        "log": log_name,
    })
    card["exemplar_fine_tunes"] = stages
    log = base / "train_log.jsonl"
    logs = [base / str(earlier.get("log", "train_log_exemplars.jsonl")) for earlier in stages[:-1]]
    write_checkpoint(model, out, card, log if log.is_file() else work / "train_log.jsonl", extra_files=logs)
    shutil.copy(work / "train_log.jsonl", out / log_name)
