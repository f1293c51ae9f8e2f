"""``python -m training speed``: optimizer steps per second of the real training step.

Runs the exemplar-stage step (forward with deep supervision, batched objective, backward,
AdamW) on a fresh shapes-size model for a few warm-up steps and then ``steps`` timed ones,
from batches built beforehand (scene generation runs in DataLoader workers during training,
so it is not what limits a step). Reports steps/s and the milliseconds of each phase; on CUDA
the phases are timed with synchronisation, so the figures are what one step really costs.
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch

from training.data import DataOptions, make_batch, training_tokenizer
from training.forward import forward_train
from training.losses import LossWeights, detection_loss
from training.trainer import Device


def measure(*, steps: int, warmup: int, images: int, prompts: int, device: Device, threads: int) -> dict[str, float]:
    from training.base import FROZEN_TEXT, model_dims, new_model

    torch.set_num_threads(threads)
    model = new_model(0).to(device.name).train()
    params = [p for n, p in model.named_parameters() if not n.startswith(FROZEN_TEXT)]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    image_size, mask_size = model_dims(model)
    data = DataOptions(image_size=image_size, mask_size=mask_size, images_per_step=images,
                       prompts_per_image=prompts, exemplar_share=0.3, hard_negative_share=0.7)
    tokenizer = training_tokenizer()
    batches = [make_batch(data, step, tokenizer).to(device.name) for step in range(min(steps + warmup, 16))]
    autocast = torch.autocast("cuda" if device.is_cuda else "cpu", dtype=torch.bfloat16, enabled=device.bf16)
    weights = LossWeights(presence_gated_cls=True)

    def sync() -> float:
        if device.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    phases = {"forward_ms": 0.0, "loss_ms": 0.0, "backward_step_ms": 0.0}
    total = 0.0
    for step in range(warmup + steps):
        batch = batches[step % len(batches)]
        t0 = sync()
        with autocast:
            out = forward_train(model, batch.pixel_values, batch.image_index, batch.input_ids, batch.attention_mask,
                                batch.exemplar_boxes, batch.exemplar_labels)
        t1 = sync()
        losses = detection_loss(out, batch.padded_targets, weights)
        t2 = sync()
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        t3 = sync()
        if step >= warmup:
            for key, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
                phases[key] += value * 1000 / steps
            total += t3 - t0
    return {"steps_per_s": round(steps / total, 3), **{k: round(v, 1) for k, v in phases.items()},
            "images_per_step": images, "prompts_per_image": prompts, "device": device.name, "bf16": device.bf16,
            "threads": threads}


def run(args) -> int:
    from training.__main__ import device_from

    device = dataclasses.replace(device_from(args), workers=0)
    result = measure(steps=args.steps, warmup=args.warmup, images=args.images, prompts=args.prompts, device=device,
                     threads=args.threads)
    print(json.dumps(result))
    return 0
