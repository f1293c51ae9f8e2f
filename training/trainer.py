"""The training loop shared by the base model and the LoRA fine-tune: seeded, resumable, logged.

State (model, optimiser, scheduler, step) is saved atomically every ``checkpoint_every``
steps in ``work_dir/state.pt``; batches are a pure function of (seed, step), so a resumed run
continues exactly where it stopped. Losses are averaged over ``log_every`` steps and appended
to ``work_dir/train_log.jsonl``; a tqdm bar shows the running loss.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn
from tqdm import tqdm

from training.data import BatchStream, DataOptions, training_tokenizer
from training.forward import forward_train
from training.losses import LossWeights, detection_loss


@dataclass(frozen=True)
class Device:
    """Where a run computes; not part of the resume check (a run may move between machines,
    bit-exact continuation only holds on the same kind)."""

    name: str = "cpu"  # "cpu", "cuda", "cuda:1", ...
    bf16: bool = False  # autocast the forward to bfloat16 (CUDA); losses stay fp32
    workers: int = 1  # DataLoader processes generating scenes

    @property
    def is_cuda(self) -> bool:
        return self.name.startswith("cuda")


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float
    warmup: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.02
    checkpoint_every: int = 250
    log_every: int = 25
    threads: int = 1


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(config.steps - config.warmup, 1)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(model: nn.Module, params: Iterable[nn.Parameter], config: TrainConfig, data: DataOptions,
          work_dir: Path, *, resume: bool, weights: LossWeights = LossWeights(), sam3: nn.Module | None = None,
          device: Device = Device()) -> None:
    """Train ``params`` of ``model`` (``sam3`` is the Sam3Model inside a PEFT wrapper, if any).

    The model is moved to ``device.name`` (and left there; callers move it back to write it).
    Per-step losses stay on the device and are read back once per log window, so a GPU step
    costs one host sync (the matching's cost matrix).
    """
    torch.set_num_threads(config.threads)
    model.to(device.name)
    work_dir.mkdir(parents=True, exist_ok=True)
    sam3 = sam3 if sam3 is not None else model
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    state_path = work_dir / "state.pt"
    log_path = work_dir / "train_log.jsonl"
    start = 0
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["train_config"] != asdict(config) or state["data"] != asdict(data):
            raise SystemExit(f"error: {state_path} was written with other settings; remove it or drop --resume")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["step"])
        print(f"resuming at step {start}/{config.steps}", file=sys.stderr)
    elif log_path.exists():
        log_path.unlink()
    if start >= config.steps:
        return

    tokenizer_dir = work_dir / "tokenizer"
    training_tokenizer(tokenizer_dir)
    loader = torch.utils.data.DataLoader(BatchStream(data, start, config.steps, str(tokenizer_dir)),
                                         batch_size=None, num_workers=device.workers, prefetch_factor=4,
                                         pin_memory=device.is_cuda)
    batches = iter(loader)  # draws its worker seed from torch's generator: before we set it
    # Dropout draws from torch's generator: seeded at the start, and saved with the state.
    if start and "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
        if device.is_cuda and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"])
    else:
        torch.manual_seed(data.seed)
    model.train()
    autocast = torch.autocast("cuda" if device.is_cuda else "cpu", dtype=torch.bfloat16, enabled=device.bf16)
    sums: dict[str, torch.Tensor] = {}
    window = 0
    started = time.time()
    bar = tqdm(total=config.steps, initial=start, unit="step", file=sys.stderr, dynamic_ncols=True)
    step = start
    for batch in batches:
        batch = batch.to(device.name)
        with autocast:
            out = forward_train(sam3, batch.pixel_values, batch.image_index, batch.input_ids, batch.attention_mask,
                                batch.exemplar_boxes, batch.exemplar_labels)
        losses = detection_loss(out, batch.padded_targets, weights)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        window += 1
        for key, value in (*losses.items(), ("grad_norm", grad_norm)):
            sums[key] = sums[key] + value.detach() if key in sums else value.detach().clone()
        bar.update(1)
        if step % config.log_every == 0 or step == config.steps:
            means = torch.stack(list(sums.values())).cpu() / window
            record = {"step": step, "lr": scheduler.get_last_lr()[0], "elapsed_s": round(time.time() - started, 1),
                      **{k: round(float(v), 5) for k, v in zip(sums, means)}}
            with log_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['total']:.3f}", cls=f"{record['cls']:.3f}",
                            presence=f"{record['presence']:.3f}", giou=f"{record['giou']:.3f}",
                            dice=f"{record['dice']:.3f}")
            sums, window = {}, 0
        if step % config.checkpoint_every == 0 or step == config.steps:
            save_state(state_path, model, optimizer, scheduler, step, config, data)
    bar.close()


def save_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: object, step: int,
               config: TrainConfig, data: DataOptions) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step,  # type: ignore[attr-defined]
                "torch_rng": torch.get_rng_state(),
                **({"cuda_rng": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}),
                "train_config": asdict(config), "data": asdict(data)}, tmp)
    os.replace(tmp, path)
