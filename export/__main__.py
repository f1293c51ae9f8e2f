"""``python -m export``: build | demo | quantize | emulate-fp16 | triton | inspect.

Every failure a user can cause (bad path, unknown format, shape mismatch, parity failure,
full disk) ends in one line on stderr and a non-zero exit, and never leaves a half-written
bundle (see export/build.py).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Sequence

EXIT_USAGE = 2
EXIT_FAILED = 1


def _progress_bar(total: int):
    from tqdm import tqdm

    bar = tqdm(total=total, unit="stage", file=sys.stderr, leave=False,
               bar_format="{desc:<28} {n_fmt}/{total_fmt} [{elapsed}]")

    def step(stage: str) -> None:
        bar.set_description_str(stage)
        bar.update(1)

    return bar, step


def _build(model, out: Path, name: str, source, *, fp16_check: bool, decoder_max_batch: int | None,
           max_cases: int | None = None, fp16_error_run: bool = True, card: dict | None = None,
           max_boxes: int | None = None) -> int:
    from export.build import DEFAULT_MAX_BOXES, BuildOptions, build_bundle

    bar, step = _progress_bar(total=8)
    try:
        manifest = build_bundle(model, out, BuildOptions(
            name=name, source=source, progress=step, fp16_check=fp16_check,
            decoder_max_batch=decoder_max_batch, max_cases=max_cases, fp16_error_run=fp16_error_run,
            card=card or {}, max_boxes=DEFAULT_MAX_BOXES if max_boxes is None else max_boxes))
    finally:
        bar.close()
    print(f"wrote {out} ({name}): parity {_parity_line(manifest.parity['summary'])}; "
          f"TensorRT op audit: {'all supported' if manifest.op_audit['all_supported'] else 'UNSUPPORTED ops'}")
    if "exemplars" in manifest.parity:
        print(f"exemplar prompts (up to {manifest.max_boxes} boxes): parity "
              f"{_parity_line(manifest.parity['exemplars']['summary'])}")
    for note in manifest.export.get("config_notes", []):
        print(f"note: {note}")
    return 0


def _parity_line(summary: dict) -> str:
    """One line of an end-to-end parity summary (export verification, int8 vs fp32)."""
    return (f"over {summary['cases']} cases: logits max abs {summary['logits_max_abs']:.2e}, presence "
            f"{summary['presence_max_abs']:.2e}, boxes {summary['boxes_max_abs']:.2e}, mask IoU min "
            f"{summary['mask_iou_min']:.5f}, same top query {summary['same_top_query']}")


def cmd_build(args: argparse.Namespace) -> int:
    from engines.bundle import SourceInfo
    from export.checkpoints import load_checkpoint

    from export.lora import LoraOptions, merge_adapters

    lora_options = LoraOptions(rank=args.lora_rank, alpha=args.lora_alpha, config=args.lora_config)
    loaded = load_checkpoint(args.checkpoint, image_size=args.image_size, config=args.config, lora=lora_options)
    model = loaded.model
    loras: list[dict] = []
    if args.lora:
        model, loras = merge_adapters(model, args.lora, lora_options, checkpoint_format=loaded.format)
    source = SourceInfo(checkpoint=loaded.source_name, checkpoint_sha256=loaded.sha256, format=loaded.format,
                        loras=tuple(loras))
    from export.model_card import read_model_card

    card = getattr(args, "card", None) or read_model_card(args.checkpoint, args.lora or ())
    name = args.name or card.get("name") or Path(args.checkpoint).stem
    return _build(model, Path(args.out), name, source, fp16_check=not args.skip_fp16_check,
                  decoder_max_batch=args.decoder_max_batch, max_cases=args.verify_cases,
                  fp16_error_run=not args.skip_fp16_error_run, card=card,
                  max_boxes=getattr(args, "max_boxes", None))


def cmd_demo(args: argparse.Namespace) -> int:
    """A seeded random-weight SAM3 (preset ``demo``) saved as a real HF checkpoint, then built."""
    import torch
    from transformers import Sam3Model

    from export.presets import preset_config

    torch.manual_seed(args.seed)
    config = preset_config(args.preset)
    model = Sam3Model(config).eval()
    with tempfile.TemporaryDirectory(prefix="sam3-demo-ckpt-") as tmp:
        checkpoint = Path(tmp) / f"sam3-{args.preset}-random"
        model.save_pretrained(checkpoint)
        del model  # the build reloads it from the checkpoint; don't hold two copies (3.4 GB each at full size)
        build_args = argparse.Namespace(
            checkpoint=str(checkpoint), out=args.out, image_size=None, config=None,
            lora=None, lora_rank=None, lora_alpha=None, lora_config=None,
            name=f"sam3-{args.preset}-random-weights", skip_fp16_check=args.skip_fp16_check,
            skip_fp16_error_run=args.skip_fp16_error_run,
            decoder_max_batch=args.decoder_max_batch, verify_cases=args.verify_cases,
            max_boxes=args.max_boxes, card={"name": f"sam3-{args.preset}-random-weights", "random_weights": True,
                  "description": "Random weights (seeded): the real architecture for performance work; "
                                 "its masks are meaningless."})
        code = cmd_build(build_args)
    print("note: the demo model has RANDOM weights: its masks are meaningless. "
          "See README 'Export real weights' to export facebook/sam3.")
    return code


def cmd_quantize(args: argparse.Namespace) -> int:
    """Opt-in int8 CPU bundle (see export/quantize.py): faster cold path, measured parity loss."""
    from export.quantize import quantize_bundle

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    manifest = quantize_bundle(Path(args.bundle), Path(args.out), parts)
    print(f"wrote {args.out} ({manifest.name}, ONNX Runtime CPU only): int8 {', '.join(parts)}; vs the fp32 "
          f"bundle {_parity_line(manifest.parity['int8_vs_fp32']['summary'])}")
    return 0


def cmd_emulate_fp16(args: argparse.Namespace) -> int:
    """A CPU copy of a bundle that rounds like a TensorRT FP16 engine (see export/fp16_emulation.py)."""
    from export.fp16_emulation import emulate_bundle

    manifest = emulate_bundle(Path(args.bundle), Path(args.out))
    counts = manifest.export["quantization"]["counts"]
    rounded = sum(c["rounded_outputs"] for c in counts.values())
    print(f"wrote {args.out} ({manifest.name}, ONNX Runtime CPU only): {rounded} node outputs rounded to fp16, "
          f"normalisation/softmax/reduce and {sum(len(p.fp32_layers) for p in manifest.parts.values())} "
          f"manifest layers kept in fp32")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from engines.bundle import Bundle

    bundle = Bundle(args.bundle, verify_hashes=True)
    manifest = bundle.manifest
    if args.json:
        print(json.dumps(manifest.to_json(), indent=2))
        return 0
    model = manifest.model
    print(f"bundle   {bundle.root} (schema {manifest.schema_version}): {manifest.name}")
    print(f"model    sam3 {model.image_size}px patch {model.patch_size}, hidden {model.hidden_size}, "
          f"{model.num_queries} queries, masks {model.mask_size[0]}x{model.mask_size[1]}")
    print(f"source   {manifest.source.checkpoint} ({manifest.source.format}) sha256 "
          f"{manifest.source.checkpoint_sha256[:16]}")
    for lora in manifest.source.loras:
        print(f"lora     {lora.get('name', lora.get('path'))} ({lora.get('format')}) targets {lora.get('parts')}")
    for part in manifest.parts.values():
        params = model.parameters.get(part.name, 0)
        shapes = ", ".join(f"{t.name}{list(t.shape)}" for t in part.outputs)
        print(f"part     {part.name:<13} {params / 1e6:8.2f} M params  weights {part.weights_sha256[:12]}  "
              f"sha256 ok  -> {shapes}  fp32-pinned {len(part.fp32_layers)}")
    if manifest.source.loras:
        shared = [p for p in ("image_encoder", "text_encoder")
                  if all(l.get("base_weights_sha256", {}).get(p) == manifest.part(p).weights_sha256
                         for l in manifest.source.loras)]
        print(f"shared   encoders identical to the base model: {', '.join(shared) or 'none'}")
    summary = manifest.parity.get("summary", {})
    if summary:
        print(f"parity   logits {summary['logits_max_abs']:.2e}  presence {summary['presence_max_abs']:.2e}  "
              f"boxes {summary['boxes_max_abs']:.2e}  mask IoU min {summary['mask_iou_min']:.5f}  "
              f"same top query {summary['same_top_query']} ({summary['cases']} cases)")
    audit = manifest.op_audit
    if audit:
        print(f"tensorrt op audit: {'all supported' if audit['all_supported'] else 'UNSUPPORTED'} "
              f"({audit['source'].split(',')[0]})")
    return 0


def _add_verify_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-fp16-check", action="store_true", help="skip the fp16 range report")
    parser.add_argument("--skip-fp16-error-run", action="store_true",
                        help="measure fp16 ranges but skip running a half-precision copy (slow on CPUs at full size)")
    parser.add_argument("--verify-cases", type=int, default=None,
                        help="end-to-end parity cases (default: all 5 sample images; 1-2 for full size on a CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="export a checkpoint to a verified bundle")
    build.add_argument("--checkpoint", required=True, help="HF dir (config.json + model.safetensors), sam3.pt "
                       "or a Meta trainer checkpoint.pt")
    build.add_argument("--out", required=True, help="bundle directory to write (replaced atomically)")
    build.add_argument("--image-size", type=int, default=None, help="input resolution (e.g. 252 for SAM3-Small)")
    build.add_argument("--config", default=None, help="Sam3Config JSON or a preset name for Meta checkpoints")
    build.add_argument("--name", default=None, help="bundle name (default: checkpoint file name)")
    build.add_argument("--lora", action="append", default=None, help="LoRA adapter to merge (repeatable)")
    build.add_argument("--lora-rank", type=int, default=None)
    build.add_argument("--lora-alpha", type=float, default=None)
    build.add_argument("--lora-config", default=None, help="training YAML holding LoRA rank/alpha")
    build.add_argument("--decoder-max-batch", type=int, default=None,
                       help="max prompts per text-encoder/decoder call (default: 8, or 2 for 288x288-mask models)")
    build.add_argument("--max-boxes", type=int, default=None,
                       help="exemplar boxes per prompt the box-prompt graphs take (default 16; 0: text prompts only)")
    _add_verify_flags(build)
    build.set_defaults(func=cmd_build)

    demo = sub.add_parser("demo", help="export the embedded random-weight demo model")
    demo.add_argument("--out", required=True)
    demo.add_argument("--preset", default="demo", help="model shape from export/configs (demo, tiny, sam3_small, full)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--decoder-max-batch", type=int, default=None)
    demo.add_argument("--max-boxes", type=int, default=None, help="as for build (0: text prompts only)")
    _add_verify_flags(demo)
    demo.set_defaults(func=cmd_demo)

    quantize = sub.add_parser("quantize", help="write an int8 ONNX Runtime CPU copy of a bundle (opt-in)")
    quantize.add_argument("bundle", help="an fp32 bundle written by build/demo")
    quantize.add_argument("--out", required=True, help="the int8 bundle directory to write")
    quantize.add_argument("--parts", default="image_encoder",
                          help="comma-separated parts to quantize (default: image_encoder, the cold path's cost)")
    quantize.set_defaults(func=cmd_quantize)

    emulate = sub.add_parser("emulate-fp16", help="write a CPU copy of a bundle that rounds like TensorRT FP16")
    emulate.add_argument("bundle", help="an fp32 bundle written by build/demo")
    emulate.add_argument("--out", required=True, help="the emulation bundle directory to write")
    emulate.set_defaults(func=cmd_emulate_fp16)

    inspect = sub.add_parser("inspect", help="print a bundle's manifest summary and re-check sha256")
    inspect.add_argument("bundle")
    inspect.add_argument("--json", action="store_true", help="print the whole manifest")
    inspect.set_defaults(func=cmd_inspect)

    from export.triton import add_parser as add_triton_parser  # torch-free: a Triton model repository

    add_triton_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted; no bundle was written", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the user; the bundle is untouched (atomic writes)
        return _report(exc)


def _report(exc: BaseException) -> int:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        message = f"out of disk space while writing: {exc.filename or ''}".strip()
    else:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"error: {type(exc).__name__}: {message}", file=sys.stderr)
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
