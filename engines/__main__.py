"""``python -m engines``: build TensorRT plans, check them against ONNX Runtime, segment, bench.

    python -m engines build   BUNDLE [--precision fp16|fp32] [--workspace-mb N] [--max-batch N]
    python -m engines check   BUNDLE [--precision fp16|fp32] [--atol A] [--rtol R]
    python -m engines segment BUNDLE IMAGE "prompt" [...] [--json out.json] [--out overlay.png]
    python -m engines bench   BUNDLE [--iterations N] [--backend ...]

Typed errors become one line on stderr and a non-zero exit (2 where the machine lacks
TensorRT or a GPU, 1 otherwise); a traceback means a bug, never bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from engines.bundle import EXEMPLAR_PART_NAMES, PART_NAMES, Bundle, TensorNames
from engines.errors import BackendUnavailable, InvalidOption, InvalidPrompt, Sam3Error
from engines.factory import BACKEND_KINDS, open_backend
from engines.options import SegmentOptions
from engines.postprocess import MASK_FORMATS, result_document
from engines.types import STAGES, ExemplarBox, Prompt, PromptResult

EXIT_OK, EXIT_ERROR, EXIT_UNAVAILABLE = 0, 1, 2
ENGINES_DIR_ENV = "SAM3_ENGINES_DIR"  # shared with the server and the container entrypoint
# fp16 vs fp32 tolerances for `check`: mask logits reach |30|, so a relative term matters;
# polygraphy's fp32 defaults (1e-5) are for bit-faithful fp32 builds only.
DEFAULT_TOLERANCE = {"fp16": (5e-2, 5e-2), "fp32": (1e-3, 1e-3)}
CHECK_PROMPTS = ("a cat", "the red car on the left", "person", "a photo of a dog")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args) or EXIT_OK)
    except BackendUnavailable as exc:
        print(f"error [{exc.code}]: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except Sam3Error as exc:
        print(f"error [{exc.code}]: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # writing --json/--out
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engines", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="build TensorRT plans into BUNDLE/engines (Jetson/GPU only)")
    build.add_argument("bundle")
    build.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    build.add_argument("--workspace-mb", type=int, default=None, help="builder workspace (default 1024 MiB)")
    build.add_argument("--max-batch", type=int, default=None, help="profile max batch (default: manifest)")
    build.add_argument("--parts", nargs="+", choices=PART_NAMES + EXEMPLAR_PART_NAMES, default=None,
                       help="default: every graph in the bundle (the exemplar graphs where present)")
    build.add_argument("--force", action="store_true", help="rebuild even when a current plan exists")
    _engines_dir_argument(build)
    build.set_defaults(func=cmd_build)

    check = sub.add_parser("check", help="compare TensorRT with ONNX Runtime outputs (Jetson/GPU only)")
    check.add_argument("bundle")
    check.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    check.add_argument("--atol", type=float, default=None)
    check.add_argument("--rtol", type=float, default=None)
    check.add_argument("--json", dest="json_out", default=None, help="write the full report here")
    _engines_dir_argument(check)
    check.set_defaults(func=cmd_check)

    seg = sub.add_parser("segment", help="segment IMAGE with text prompts and/or exemplar boxes")
    seg.add_argument("bundle")
    seg.add_argument("image")
    seg.add_argument("prompts", nargs="*", metavar="prompt",
                     help="text prompts; with --box/--negative-box at most one, which the boxes join")
    seg.add_argument("--box", action="append", type=_box, default=[], metavar="x0,y0,x1,y1",
                     help="exemplar box in image pixels: find everything like it (repeatable)")
    seg.add_argument("--negative-box", action="append", type=_box, default=[], metavar="x0,y0,x1,y1",
                     help="negative exemplar: not like this (repeatable)")
    seg.add_argument("--score-threshold", type=float, default=0.5)
    seg.add_argument("--mask-threshold", type=float, default=0.5)
    seg.add_argument("--max-detections", type=int, default=None)
    seg.add_argument("--mask-format", choices=MASK_FORMATS, default="rle")
    seg.add_argument("--out", default=None, help="overlay PNG (masks, boxes, labels)")
    seg.add_argument("--json", dest="json_out", default=None, help="result document ('-' for stdout)")
    seg.add_argument("--backend", choices=BACKEND_KINDS, default="auto")
    seg.add_argument("--max-megapixels", type=float, default=None)
    _engines_dir_argument(seg)
    seg.set_defaults(func=cmd_segment)

    bench = sub.add_parser("bench", help="per-stage latency micro-benchmark (not a test)")
    bench.add_argument("bundle")
    bench.add_argument("--backend", choices=BACKEND_KINDS, default="auto")
    bench.add_argument("--image", default=None, help="default: a synthetic 640x480 image")
    bench.add_argument("--prompts", nargs="+", default=["a cat", "a dog"])
    bench.add_argument("--iterations", type=int, default=20)
    bench.add_argument("--warmup", type=int, default=3)
    _engines_dir_argument(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def _engines_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engines-dir",
        default=os.environ.get(ENGINES_DIR_ENV) or None,
        help=f"where TensorRT plans live (default: ${ENGINES_DIR_ENV}, else BUNDLE/engines)",
    )


# ---------------------------------------------------------------------------------- build


def cmd_build(args: argparse.Namespace) -> int:
    from engines.tensorrt import DeviceThread
    from engines.tensorrt_build import DEFAULT_WORKSPACE_MB, BuildSettings, check_tensorrt, ensure_plan

    bundle = Bundle(args.bundle)
    settings = BuildSettings(
        precision=args.precision,
        workspace_mb=args.workspace_mb or DEFAULT_WORKSPACE_MB,
        max_batch=args.max_batch,
    )
    engines_dir = Path(args.engines_dir) if args.engines_dir else bundle.engines_dir
    version = check_tensorrt()  # BackendUnavailable -> exit 2 with the reason
    device = DeviceThread()
    try:
        cc = device.cuda.compute_capability
        print(
            f"TensorRT {version} on {device.cuda.name} (sm {cc}), {settings.precision}, "
            f"workspace {settings.workspace_mb} MiB -> {engines_dir}"
        )
        parts = args.parts or [*PART_NAMES, *(p for p in EXEMPLAR_PART_NAMES if p in bundle.manifest.parts)]
        for part in parts:
            result = device.call(
                ensure_plan, bundle, part, settings, device.cuda, force=args.force, engines_dir=engines_dir
            )
            summary = result.log.get("precision_summary", {}).get("by_precision", {})
            verb = f"built in {result.seconds:.0f}s" if result.built else "current, reused"
            print(f"  {part:14s} {result.plan.name}  {verb}  layers by precision {summary}")
    finally:
        device.close()
    return EXIT_OK


# ---------------------------------------------------------------------------------- check


def cmd_check(args: argparse.Namespace) -> int:
    from engines.pipeline import Sam3Pipeline
    from engines.preprocess import to_pixel_values
    from engines.tensorrt_build import tolerance_report

    bundle = Bundle(args.bundle)
    default_atol, default_rtol = DEFAULT_TOLERANCE[args.precision]
    atol = default_atol if args.atol is None else args.atol
    rtol = default_rtol if args.rtol is None else args.rtol
    # exit 2 off-device
    trt_backend = open_backend(bundle, "tensorrt", precision=args.precision, engines_dir=args.engines_dir)
    reference = Sam3Pipeline(bundle, open_backend(bundle, "onnxruntime", providers=["CPUExecutionProvider"]))
    try:
        names = [*PART_NAMES, *(EXEMPLAR_PART_NAMES if reference.max_boxes else ())]
        parts = {name: trt_backend.load(name) for name in names}
        image = reference.load_image(_synthetic_image(640, 480))
        pixel_values = to_pixel_values(image.pixels, bundle.manifest.preprocessing)
        ids, mask = reference.tokenizer.encode(list(CHECK_PROMPTS[: parts["text_encoder"].max_batch]))
        image_emb = reference.encode_image(image)
        text_emb = reference.encode_text(list(CHECK_PROMPTS[: parts["decoder"].max_batch]))
        feeds = {
            "image_encoder": {TensorNames.PIXEL_VALUES: pixel_values},
            "text_encoder": {TensorNames.INPUT_IDS: ids, TensorNames.ATTENTION_MASK: mask},
            # Decoder fed the *reference* encoder outputs: each part is judged on its own.
            "decoder": reference.decoder_inputs(image_emb, text_emb),
        }
        if reference.max_boxes:  # the exemplar graphs, each fed the reference's upstream outputs
            width, height = image.size
            prompt = Prompt(boxes=(ExemplarBox((0.2 * width, 0.2 * height, 0.6 * width, 0.7 * height)),
                                           ExemplarBox((0.6 * width, 0.5 * height, 0.9 * width, 0.9 * height),
                                                       positive=False)))
            count = len(text_emb.prompts)
            level = parts["geometry_encoder"].spec.input_names[0]
            feeds["geometry_encoder"] = {level: image_emb.tensors[level],
                                         **reference.exemplar_inputs([prompt] * count, image.size)}
            geometry = reference.parts["geometry_encoder"].run(feeds["geometry_encoder"])
            feeds["exemplar_decoder"] = {**image_emb.tensors, **text_emb.tensors, **geometry}
        report: dict[str, Any] = {"precision": args.precision, "device": trt_backend.device, "parts": {}}
        for name in names:
            feed = {
                t.name: np.ascontiguousarray(feeds[name][t.name], dtype=t.dtype)
                for t in parts[name].spec.inputs
            }
            want = reference.parts[name].run(feed)
            started = time.perf_counter()
            got = parts[name].run(feed)
            part_report = tolerance_report(want, got, atol=atol, rtol=rtol)
            part_report["tensorrt_ms"] = round((time.perf_counter() - started) * 1000, 2)
            report["parts"][name] = part_report
            for tensor, stats in part_report["tensors"].items():
                verdict = "PASS" if stats["passed"] else "FAIL"
                detail = stats.get("error") or (
                    f"max|d| {stats['max_abs']:.3g}  mean|d| {stats['mean_abs']:.3g}  "
                    f"violations {stats['violations']}/{stats['elements']}"
                )
                print(f"{verdict}  {name:14s} {tensor:16s} {detail}")
        report["passed"] = all(p["passed"] for p in report["parts"].values())
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"{'PASSED' if report['passed'] else 'FAILED'} (atol {atol:g}, rtol {rtol:g})")
        return EXIT_OK if report["passed"] else EXIT_ERROR
    finally:
        reference.close()
        trt_backend.close()


# ---------------------------------------------------------------------------------- segment


def _box(text: str) -> tuple[float, float, float, float]:
    """``x0,y0,x1,y1`` -> four floats (the pipeline checks they make a box inside the image)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a box is x0,y0,x1,y1 in pixels, got {text!r}") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"a box is x0,y0,x1,y1 in pixels, got {text!r}")
    return values  # type: ignore[return-value]


def cmd_segment(args: argparse.Namespace) -> int:
    from engines.pipeline import Sam3Pipeline

    # Refuse bad options before any compute.
    if args.out and not args.out.lower().endswith(".png"):
        raise InvalidOption(f"--out must name a .png file, got {args.out!r}")
    options = SegmentOptions(
        score_threshold=args.score_threshold,
        mask_threshold=args.mask_threshold,
        max_detections=args.max_detections,
        with_masks=args.mask_format != "none" or args.out is not None,
    )
    boxes = tuple(ExemplarBox(b) for b in args.box) + tuple(ExemplarBox(b, positive=False) for b in args.negative_box)
    if boxes and len(args.prompts) > 1:
        raise InvalidPrompt("--box/--negative-box make one prompt: give at most one text prompt with them")
    if not boxes and not args.prompts:
        raise InvalidPrompt("give a text prompt, --box, or both")
    with Sam3Pipeline.from_bundle(
        args.bundle,
        args.backend,
        max_prompts=max(len(args.prompts), 1),
        max_megapixels=args.max_megapixels,
        engines_dir=args.engines_dir,
    ) as pipe:
        image = pipe.load_image(args.image)
        prompts = [Prompt(text=args.prompts[0] if args.prompts else None, boxes=boxes)] if boxes else args.prompts
        result = pipe.segment(image, prompts, options)
        device = pipe.backend.device
    width, height = result.image_size
    print(f"{Path(args.image).name}: {width}x{height}, backend {result.extra['backend']} on {device}")
    for res in result.results:
        best = f", best {res.detections[0].score:.3f}" if res.detections else ""
        print(f"  {res.prompt!r}: {len(res.detections)} detection(s){best}")
    print("  timings ms: " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings_ms.items()))
    if args.json_out:
        document = result_document(result.image_size, result.results, args.mask_format)
        text = json.dumps(document) + "\n"
        if args.json_out == "-":
            sys.stdout.write(text)
        else:
            Path(args.json_out).write_text(text)
            print(f"  wrote {args.json_out}")
    if args.out:
        write_png(args.out, draw_overlay(image.pixels, result.results))
        print(f"  wrote {args.out}")
    return EXIT_OK


PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
)  # fmt: skip  (RGB)


def draw_overlay(pixels: np.ndarray, results: Sequence[PromptResult], alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 image + results -> BGR uint8 overlay (masks tinted, boxes, "prompt score" labels).

    One colour per prompt so several prompts stay readable; line width and font scale follow
    the image size so labels are legible on 4000 px photos and on 112 px test images.
    """
    canvas = pixels.astype(np.float32)
    for index, result in enumerate(results):
        colour = np.asarray(PALETTE[index % len(PALETTE)], dtype=np.float32)
        # Tint the union once: overlapping detections must not compound into an opaque colour.
        union = np.zeros(pixels.shape[:2], dtype=bool)
        for det in result.detections:
            if det.mask is not None and det.mask.shape == pixels.shape[:2]:
                union |= det.mask
        canvas[union] = canvas[union] * (1 - alpha) + colour * alpha
    out = cv2.cvtColor(np.clip(canvas, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
    height, width = pixels.shape[:2]
    thickness = max(1, round(max(height, width) / 400))
    font_scale = max(0.35, max(height, width) / 1400)
    for index, result in enumerate(results):
        r, g, b = PALETTE[index % len(PALETTE)]
        bgr = (b, g, r)
        for det in result.detections:
            x0, y0, x1, y1 = (int(round(v)) for v in det.box)
            cv2.rectangle(out, (x0, y0), (x1, y1), bgr, thickness)
            label = f"{result.prompt} {det.score:.2f}"
            (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
            ty = max(th + base, y0)
            cv2.rectangle(out, (x0, ty - th - base), (x0 + tw, ty), bgr, -1)
            cv2.putText(
                out,
                label,
                (x0, ty - base),
                cv2.FONT_HERSHEY_SIMPLEX,
                font_scale,
                (255, 255, 255),
                thickness,
                cv2.LINE_AA,
            )
    return out


def write_png(path: str, bgr: np.ndarray) -> None:
    if not path.lower().endswith(".png"):
        raise InvalidOption(f"--out must name a .png file, got {path!r}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", bgr)
    if not ok:
        raise InvalidOption("PNG encoding of the overlay failed")
    Path(path).write_bytes(buf.tobytes())


# ---------------------------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> int:
    from engines.pipeline import Sam3Pipeline

    if args.iterations < 1 or args.warmup < 0:
        raise InvalidOption("--iterations must be >= 1 and --warmup >= 0")
    with Sam3Pipeline.from_bundle(
        args.bundle, args.backend, max_prompts=max(len(args.prompts), 1), engines_dir=args.engines_dir
    ) as pipe:
        source: Any = args.image if args.image else _synthetic_image(640, 480)
        image = pipe.load_image(source)
        samples: dict[str, list[float]] = {}
        for i in range(args.warmup + args.iterations):
            result = pipe.segment(image, args.prompts)
            if i >= args.warmup:
                for stage, ms in result.timings_ms.items():
                    samples.setdefault(stage, []).append(ms)
        embedding = pipe.encode_image(image)
        text = pipe.encode_text(args.prompts)
        cached = []
        for _ in range(args.iterations):
            started = time.perf_counter()
            pipe.segment(embedding, args.prompts, text=text)  # decoder + postprocess only
            cached.append((time.perf_counter() - started) * 1000)
        print(
            f"bundle {pipe.manifest.name} ({pipe.manifest.model.image_size} px), backend "
            f"{pipe.backend.kind} on {pipe.backend.device}, {pipe.backend.precision}; "
            f"{len(args.prompts)} prompt(s), {args.iterations} iterations"
        )
        print(f"{'stage':16s} {'median ms':>10s} {'p90 ms':>10s}")
        for stage in (*STAGES, "total"):
            values = sorted(samples.get(stage, [0.0]))
            p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
            print(f"{stage:16s} {statistics.median(values):10.2f} {p90:10.2f}")
        print(f"{'decode (cached)':16s} {statistics.median(cached):10.2f}")
        if pipe.max_boxes:
            # A new box on a cached image: geometry encoder + exemplar decoder, nothing else.
            width, height = image.size
            box = Prompt(boxes=(ExemplarBox((width * 0.3, height * 0.3, width * 0.6, height * 0.7)),))
            pipe.segment(embedding, [box])  # encodes "visual" once
            boxed = []
            for _ in range(args.iterations):
                started = time.perf_counter()
                pipe.segment(embedding, [box])
                boxed.append((time.perf_counter() - started) * 1000)
            print(f"{'1 box (cached)':16s} {statistics.median(boxed):10.2f}")
        memory = pipe.backend.memory()
        if memory.host_rss_bytes:
            print(f"host RSS {memory.host_rss_bytes / 2**20:.0f} MiB")
    return EXIT_OK


def _synthetic_image(width: int, height: int) -> np.ndarray:
    """A deterministic picture with edges and flat regions (no sample files on the device)."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x ^ y) & 255], -1)
    image = image.astype(np.uint8)
    cv2.circle(image, (width // 3, height // 2), min(width, height) // 5, (220, 40, 40), -1)
    cv2.rectangle(image, (width // 2, height // 4), (width * 5 // 6, height * 3 // 4), (30, 200, 60), -1)
    return image


if __name__ == "__main__":
    sys.exit(main())
