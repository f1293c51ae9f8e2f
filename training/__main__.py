"""``python -m training``: train the demo model (``base``) and its star adapter (``lora``).

    python -m training base --out models/shapes             # ~65 min on one CPU core
    python -m training exemplars --base models/shapes                 # + box prompts, in place
    python -m training exemplars --base models/shapes --steps 2000 --lr 4e-4 \
        --exemplar-share 0.3 --aux-copies 1 --seed 4                  # stage 2: an hour more, mixed
    python -m training lora --base models/shapes --out models/shapes-star-lora
    python -m training speed [--device cuda]                          # optimizer steps per second

Both are seeded and resumable (``--resume`` continues from ``<out>.work/state.pt``). Training
state lives in ``<out>.work/`` (not committed); the output directory receives the shipped
artefacts only. Needs torch (the export requirements); never imported by engines/ or server/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # torch is imported by the command that runs, not by --help
    from training.base import ExemplarStage


def cmd_base(args: argparse.Namespace) -> int:
    from training.base import train_base

    train_base(Path(args.out), steps=args.steps, seed=args.seed, resume=args.resume,
               images_per_step=args.images, prompts_per_image=args.prompts, lr=args.lr, threads=args.threads,
               freeze_text=args.freeze_text_encoder, device=device_from(args))
    return 0


def exemplar_stage(args: argparse.Namespace) -> ExemplarStage:
    """The ``exemplars`` command's options as the stage recipe (training.base.ExemplarStage)."""
    from training.base import ExemplarStage

    return ExemplarStage(steps=args.steps, lr=args.lr, seed=args.seed, exemplar_share=args.exemplar_share,
                         aux_copies=args.aux_copies, hard_negative_share=args.hard_negatives,
                         prompts_per_image=args.prompts, images_per_step=args.images,
                         train_text_projection=args.train_text_projection,
                         presence_gated_cls=args.presence_gated_cls, presence_weight=args.presence_weight,
                         colour_distractor_share=args.colour_distractors, shape_prompt_share=args.shape_prompts)


def cmd_exemplars(args: argparse.Namespace) -> int:
    from training.base import finetune_exemplars

    finetune_exemplars(Path(args.base), Path(args.out or args.base), exemplar_stage(args), resume=args.resume,
                       threads=args.threads, device=device_from(args))
    return 0


def cmd_lora(args: argparse.Namespace) -> int:
    from training.lora import train_lora

    train_lora(Path(args.base), Path(args.out), steps=args.steps, seed=args.seed, resume=args.resume,
               rank=args.rank, alpha=args.alpha, lr=args.lr, hard_negative_share=args.hard_negatives,
               presence_gated_cls=args.presence_gated_cls, threads=args.threads, device=device_from(args))
    return 0


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 autocast of the forward (default: on for CUDA, off on the CPU)")
    parser.add_argument("--workers", type=int, default=None,
                        help="scene-generating DataLoader processes (default: 1 on the CPU, 6 on CUDA)")


def device_from(args: argparse.Namespace):
    from training.trainer import Device

    cuda = args.device.startswith("cuda")
    if cuda:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device {args.device}: torch sees no CUDA device")
    bf16 = cuda if args.bf16 is None else args.bf16
    workers = (6 if cuda else 1) if args.workers is None else args.workers
    if workers < 1:
        raise SystemExit("error: --workers must be at least 1")
    return Device(name=args.device, bf16=bf16, workers=workers)


def cmd_speed(args: argparse.Namespace) -> int:
    from training.speed import run

    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("error: --steps must be >= 1 and --warmup >= 0")
    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    base = sub.add_parser("base", help="train the shapes demo model from scratch")
    base.add_argument("--out", default="models/shapes")
    base.add_argument("--steps", type=int, default=2600)
    base.add_argument("--images", type=int, default=8, help="images per step")
    base.add_argument("--prompts", type=int, default=4, help="prompts per image (present and absent)")
    base.add_argument("--lr", type=float, default=4e-4)
    base.add_argument("--seed", type=int, default=0)
    base.add_argument("--resume", action="store_true")
    base.add_argument("--train-text-encoder", dest="freeze_text_encoder", action="store_false",
                      help="also train the text encoder and its projection (frozen at their seeded init by default)")
    base.add_argument("--threads", type=int, default=1, help="torch threads (1 trains fastest per core; 2 only on an idle machine)")
    add_device_arguments(base)
    base.set_defaults(func=cmd_base)

    ex = sub.add_parser("exemplars", help="fine-tune the base model on exemplar (box) prompts too")
    ex.add_argument("--base", default="models/shapes")
    ex.add_argument("--out", default=None, help="default: --base, rewritten in place (atomically)")
    ex.add_argument("--steps", type=int, default=400)
    ex.add_argument("--lr", type=float, default=1.5e-4)
    ex.add_argument("--exemplar-share", type=float, default=0.5, help="share of present prompts given a box")
    ex.add_argument("--aux-copies", type=int, default=3,
                    help="queries matched per object in the intermediate decoder layers (1: one-to-one)")
    ex.add_argument("--hard-negatives", type=float, default=0.0,
                    help="share of absent prompts that name a near miss (an object's shape in another colour, ...)")
    ex.add_argument("--images", type=int, default=8, help="images per step")
    ex.add_argument("--prompts", type=int, default=4, help="prompts per image (present and absent)")
    ex.add_argument("--train-text-projection", action="store_true",
                    help="let the linear map after the frozen text encoder learn")
    ex.add_argument("--presence-gated-cls", action="store_true",
                    help="no query classification loss on absent prompts (Meta's SAM3 objective: presence decides)")
    ex.add_argument("--presence-weight", type=float, default=2.0,
                    help="weight of the presence token's loss (2: as the base run)")
    ex.add_argument("--colour-distractors", type=float, default=0.0,
                    help="share of the unknown-word prompts that pair a known colour with an unknown word "
                         "('blue hexagon')")
    ex.add_argument("--shape-prompts", type=float, default=0.0,
                    help="share of present prompts that name a shape alone, the one with the most objects")
    ex.add_argument("--seed", type=int, default=2)
    ex.add_argument("--resume", action="store_true")
    ex.add_argument("--threads", type=int, default=1)
    add_device_arguments(ex)
    ex.set_defaults(func=cmd_exemplars)

    lora = sub.add_parser("lora", help="train a LoRA adapter that teaches the held-out shape 'star'")
    lora.add_argument("--base", default="models/shapes")
    lora.add_argument("--out", default="models/shapes-star-lora")
    lora.add_argument("--steps", type=int, default=600)
    lora.add_argument("--rank", type=int, default=8)
    lora.add_argument("--alpha", type=float, default=16.0)
    lora.add_argument("--lr", type=float, default=1e-3)
    lora.add_argument("--hard-negatives", type=float, default=0.0, help="as for exemplars")
    lora.add_argument("--presence-gated-cls", action="store_true", help="as for exemplars")
    lora.add_argument("--threads", type=int, default=1)
    lora.add_argument("--seed", type=int, default=1)
    lora.add_argument("--resume", action="store_true")
    add_device_arguments(lora)
    lora.set_defaults(func=cmd_lora)

    speed = sub.add_parser("speed", help="measure optimizer steps per second (no training state, nothing written)")
    speed.add_argument("--steps", type=int, default=10)
    speed.add_argument("--warmup", type=int, default=2)
    speed.add_argument("--images", type=int, default=8)
    speed.add_argument("--prompts", type=int, default=4)
    speed.add_argument("--threads", type=int, default=1)
    add_device_arguments(speed)
    speed.set_defaults(func=cmd_speed)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue from the last saved step", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
