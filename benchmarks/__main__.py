"""``python -m benchmarks``: pipeline | http. Prints a markdown table; writes JSON/markdown/PNG.

    python -m benchmarks pipeline --bundle DIR [--reference-checkpoint HF_DIR] --json out.json --plot out.png
    python -m benchmarks http --url http://127.0.0.1:8000 --concurrency 4 --requests 100 --compare out.json
    python -m benchmarks schema pipeline|http     # the JSON schema of the documents
    python -m benchmarks report out.json --markdown out.md --plot out.png   # re-render a saved run
    python -m benchmarks accuracy --bundle DIR --scenes 200 --json acc.json   # accuracy end to end
    python -m benchmarks accuracy --checkpoint models/shapes --dataset coco_dir  # the PyTorch model
    python -m benchmarks tracking --bundle DIR --videos 8 --streams 1 2 4   # MOTA/IDF1, stream FPS

Exit codes: 0 done, 2 bad arguments or input, 1 the benchmark failed (one line on stderr).
Goals missed are reported in the output, not as a failing exit: this is a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def outputs(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", dest="json_out", default=None, help="write the JSON document (schema: README)")
        p.add_argument("--markdown", default=None, help="write the markdown table here (also printed)")
        p.add_argument("--plot", default=None, help="write a PNG plot (matplotlib)")

    pipe = sub.add_parser("pipeline", help="per-stage latency of the runtime, and the PyTorch reference")
    pipe.add_argument("--bundle", required=True, type=Path)
    pipe.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt"))
    pipe.add_argument("--images", nargs="*", type=Path, default=[], help="image files (default: synthetic 640x480)")
    pipe.add_argument("--prompts", nargs="+", default=["a person", "a dog"], help="the prompt batch of every call")
    pipe.add_argument("--iterations", type=int, default=5, help="measured iterations per path")
    pipe.add_argument("--warmup", type=int, default=1, help="excluded iterations per path")
    pipe.add_argument("--batch", type=int, default=8, help="k for k-prompts-per-call vs k single calls")
    pipe.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: cores)")
    pipe.add_argument("--score-threshold", type=float, default=0.5)
    pipe.add_argument("--max-detections", type=int, default=None, help="per prompt (masks upsampled: at most this)")
    pipe.add_argument("--reference-checkpoint", type=Path, default=None,
                      help="HF checkpoint dir of the SAME weights; enables the transformers reference (needs torch)")
    pipe.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                      help="run the reference when a checkpoint is given (--no-reference skips it)")
    pipe.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP count of the reference")
    outputs(pipe)
    pipe.set_defaults(func=cmd_pipeline)

    http = sub.add_parser("http", help="load a running server (bounded asyncio httpx loop)")
    http.add_argument("--url", required=True)
    http.add_argument("--concurrency", type=int, default=1)
    http.add_argument("--requests", type=int, default=None, help="total requests (default 40 without --duration)")
    http.add_argument("--duration", type=float, default=None, help="seconds")
    http.add_argument("--image", dest="images", nargs="*", type=Path, default=[], help="image file (PNG/JPEG)")
    http.add_argument("--prompts", nargs="+", default=["a person", "a dog"])
    http.add_argument("--cold-fraction", type=float, default=0.25)
    http.add_argument("--mask-format", default="rle", choices=("rle", "png", "polygon", "none"))
    http.add_argument("--api-key", default=os.environ.get("SAM3_API_KEY"))
    http.add_argument("--timeout", type=float, default=120.0)
    http.add_argument("--allow-remote", action="store_true", help="allow a non-loopback URL")
    http.add_argument("--compare", type=Path, default=None, help="pipeline JSON of the same bundle for ratios")
    http.add_argument("--compare-bundle", type=Path, default=None,
                      help="the server's bundle: alternate HTTP requests with direct pipeline calls (same load)")
    http.add_argument("--pairs", type=int, default=8, help="warm and cold pairs for --compare-bundle")
    outputs(http)
    http.set_defaults(func=cmd_http)

    acc = sub.add_parser("accuracy", help="precision/recall/IoU/mask AP end to end on a COCO dataset")
    model = acc.add_mutually_exclusive_group(required=True)
    model.add_argument("--bundle", type=Path, help="a bundle, run through Sam3Pipeline")
    model.add_argument("--checkpoint", type=Path, help="an HF/Meta checkpoint, run in PyTorch (needs torch)")
    model.add_argument("--url", help="a running server (POST /segment)")
    acc.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt"))
    acc.add_argument("--lora", action="append", default=[], help="with --checkpoint: adapters to merge")
    acc.add_argument("--lora-alpha", type=float, default=None)
    acc.add_argument("--lora-config", default=None)
    acc.add_argument("--api-key", default=os.environ.get("SAM3_API_KEY"))
    data = acc.add_mutually_exclusive_group(required=True)
    data.add_argument("--dataset", type=Path, help="COCO dataset: a directory with annotations.json (or the JSON)")
    data.add_argument("--scenes", type=int, help="generate this many held-out scenes (scenes/generator.py)")
    acc.add_argument("--scene-seed", type=int, default=7, help="held-out set seed (training never uses small seeds)")
    acc.add_argument("--shapes", default="base", choices=("base", "all"),
                     help="base: circle/square/triangle; all: with the held-out star")
    acc.add_argument("--require-shape", default=None, help="every generated scene holds this shape (e.g. star)")
    acc.add_argument("--family", default="generator", choices=("generator", "shifted"),
                     help="renderer of generated scenes: the training generator's, or scenes/shifted.py "
                          "(other sizes, backgrounds, edges and JPEG encoder; never trained on)")
    acc.add_argument("--write-dataset", type=Path, default=None, help="keep the generated COCO dataset here")
    acc.add_argument("--score-threshold", type=float, default=0.5)
    acc.add_argument("--iou-threshold", type=float, default=0.5)
    acc.add_argument("--limit", type=int, default=None, help="first N images only")
    acc.add_argument("--exemplars", action="store_true",
                     help="prompt with boxes, not words: one box per category in each image (box-only), "
                          "every object of that category to find")
    acc.add_argument("--supercategory-prompts", action=argparse.BooleanOptionalAction, default=None,
                     help="also prompt with supercategory names (default: on for generated scene sets)")
    outputs(acc)
    acc.set_defaults(func=cmd_accuracy)

    track = sub.add_parser("tracking", help="MOTA/IDF1/ID switches on generated moving scenes, and stream FPS")
    track.add_argument("--bundle", type=Path, required=True)
    track.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt"))
    track.add_argument("--videos", type=int, default=8, help="generated videos (scenes/video.py)")
    track.add_argument("--video-seed", type=int, default=11)
    track.add_argument("--frames", type=int, default=40, help="frames per video (10 FPS)")
    track.add_argument("--write-videos", type=Path, default=None, help="keep the MP4 files and truth here")
    track.add_argument("--modes", nargs="+", default=list(("text", "box")), choices=("text", "box"))
    track.add_argument("--score-threshold", type=float, default=0.5)
    track.add_argument("--streams", type=int, nargs="*", default=[1, 2, 4],
                       help="stream counts for the throughput run (none: skip it)")
    track.add_argument("--stream-seconds", type=float, default=20.0)
    outputs(track)
    track.set_defaults(func=cmd_tracking)

    summary = sub.add_parser("accuracy-summary", help="one table over the accuracy reports in a directory")
    summary.add_argument("directory", type=Path)
    summary.add_argument("--same-weights", nargs=2, action="append", default=[], metavar=("BUNDLE_A", "BUNDLE_B"),
                         help="also report whether two bundles' per-part weight hashes are identical")
    summary.add_argument("--markdown", default=None)

    schema = sub.add_parser("schema", help="print the JSON schema of a benchmark document")
    schema.add_argument("kind", choices=("pipeline", "http"))

    render = sub.add_parser("report", help="re-render a saved JSON document (e.g. from a Jetson) as markdown/PNG")
    render.add_argument("document", type=Path)
    outputs(render)
    render.set_defaults(func=cmd_report)
    return parser


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.report import validate

    try:
        doc = json.loads(args.document.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {args.document}: {exc}") from None
    validate(doc)
    return doc


def cmd_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.pipeline import PipelineBenchConfig, run_pipeline_benchmark

    for image in args.images:
        if not image.is_file():
            raise UsageError(f"image not found: {image}")
    if args.reference_checkpoint is not None and not args.reference_checkpoint.exists():
        raise UsageError(f"reference checkpoint not found: {args.reference_checkpoint}")
    config = PipelineBenchConfig(
        bundle=args.bundle, backend=args.backend, images=list(args.images), prompts=list(args.prompts),
        iterations=args.iterations, warmup=args.warmup, batch=args.batch, threads=args.threads,
        score_threshold=args.score_threshold, max_detections=args.max_detections,
        reference_checkpoint=args.reference_checkpoint if args.reference else None, flops=args.flops,
    )
    try:
        config.check()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return run_pipeline_benchmark(config)


def cmd_http(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.http import HttpBenchConfig, run_http_benchmark

    config = HttpBenchConfig(
        url=args.url, concurrency=args.concurrency,
        requests=args.requests if args.requests is not None or args.duration is not None else 40,
        duration_s=args.duration, images=list(args.images), prompts=list(args.prompts),
        cold_fraction=args.cold_fraction, mask_format=args.mask_format, api_key=args.api_key,
        timeout_s=args.timeout, allow_remote=args.allow_remote, compare=args.compare,
        compare_bundle=args.compare_bundle, pairs=args.pairs,
    )
    try:
        config.check()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return run_http_benchmark(config)


def cmd_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    from benchmarks import accuracy
    from scenes.coco import write_scene_dataset
    from scenes.generator import ALL_SHAPES, BASE_SHAPES

    config = accuracy.AccuracyConfig(score_threshold=args.score_threshold, iou_threshold=args.iou_threshold,
                                     supercategory_prompts=args.supercategory_prompts, limit=args.limit,
                                     exemplars=args.exemplars)
    for name, value in (("--score-threshold", config.score_threshold), ("--iou-threshold", config.iou_threshold)):
        if not 0.0 <= value <= 1.0:
            raise UsageError(f"{name} must be in [0, 1]")
    if args.scenes is not None:
        if args.scenes < 1:
            raise UsageError("--scenes must be >= 1")
        target = args.write_dataset or Path(tempfile.mkdtemp(prefix="sam3-scenes-")) / "heldout"
        write_scene_dataset(target, args.scenes, seed=args.scene_seed,
                            shapes=ALL_SHAPES if args.shapes == "all" else BASE_SHAPES,
                            require_shape=args.require_shape, family=args.family)
        dataset_path = target
    else:
        if not args.dataset.exists():
            raise UsageError(f"dataset not found: {args.dataset}")
        dataset_path = args.dataset
    try:
        dataset = accuracy.load_dataset(dataset_path, config.supercategory_prompts)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.bundle is not None:
        if not args.bundle.is_dir():
            raise UsageError(f"bundle not found: {args.bundle}")
        segment, model = accuracy.pipeline_segmenter(args.bundle, args.backend, config)
    elif args.checkpoint is not None:
        if args.exemplars:
            raise UsageError("--exemplars runs through a bundle (--bundle) or a server (--url)")
        if not args.checkpoint.exists():
            raise UsageError(f"checkpoint not found: {args.checkpoint}")
        from benchmarks.torch_segmenter import torch_segmenter

        segment, model = torch_segmenter(args.checkpoint, args.lora, lora_alpha=args.lora_alpha,
                                         lora_config=args.lora_config, config=config)
    else:
        segment, model = accuracy.http_segmenter(args.url, config, args.api_key)
    from tqdm import tqdm

    bar = tqdm(total=min(len(dataset.coco.getImgIds()), args.limit or 10**9), unit="image", file=sys.stderr,
               leave=False)
    try:
        doc = accuracy.evaluate(segment, dataset, config, progress=lambda done, total: bar.update(1))
    finally:
        bar.close()
    doc["model"] = model
    if args.scenes is not None:
        doc["dataset"]["generated"] = {"scenes": args.scenes, "seed": args.scene_seed, "shapes": args.shapes,
                                       "require_shape": args.require_shape, "family": args.family}
    return doc


def cmd_tracking(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    from benchmarks import tracking
    from engines.pipeline import Sam3Pipeline
    from scenes.video import VideoOptions, write_video_set

    if not args.bundle.is_dir():
        raise UsageError(f"bundle not found: {args.bundle}")
    if args.videos < 1 or args.frames < 2:
        raise UsageError("--videos must be >= 1 and --frames >= 2")
    if not 0.0 < args.score_threshold <= 1.0:
        raise UsageError("--score-threshold must be in (0, 1]")
    if any(n < 1 for n in args.streams):
        raise UsageError("--streams counts must be >= 1")
    target = args.write_videos or Path(tempfile.mkdtemp(prefix="sam3-videos-"))
    options = VideoOptions(frames=args.frames)
    videos = write_video_set(target, args.videos, seed=args.video_seed, options=options)
    pipeline = Sam3Pipeline.from_bundle(args.bundle, args.backend)
    config = tracking.TrackingConfig.starting_at(args.score_threshold)
    try:
        accuracy = [tracking.evaluate_tracking(pipeline, videos, mode, config) for mode in args.modes]
        throughput = []
        if args.streams:  # one video as long as the run, so no source ends early
            long = VideoOptions(frames=max(2, int(args.stream_seconds * options.fps)))
            (clip,) = write_video_set(target / "throughput", 1, seed=args.video_seed + 1000, options=long)
            throughput = [tracking.stream_throughput(pipeline, clip, n, args.stream_seconds, config)
                          for n in args.streams]
        backend = {"kind": pipeline.backend.kind, "precision": pipeline.backend.precision}
    finally:
        pipeline.close()
    return {"kind": "tracking", "bundle": str(args.bundle), "backend": backend,
            "videos": {"count": args.videos, "seed": args.video_seed, "frames": args.frames, "fps": options.fps,
                       "size": list(options.size)},
            "accuracy": accuracy, "throughput": throughput}


class UsageError(Exception):
    pass


def _write(path: str, data: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(data)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from benchmarks import report

    if args.command == "accuracy-summary":
        from benchmarks.accuracy import summary_markdown

        text = summary_markdown(args.directory, args.same_weights)
        if args.markdown:
            _write(args.markdown, text)
        print(text)
        return EXIT_OK
    if args.command == "schema":
        print(json.dumps(report.PIPELINE_SCHEMA if args.kind == "pipeline" else report.HTTP_SCHEMA, indent=2))
        return EXIT_OK
    try:
        doc = args.func(args)
        if args.command != "report":
            doc["command"] = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
        text = report.markdown(doc)
        if args.json_out:
            _write(args.json_out, json.dumps(doc, indent=2) + "\n")
        if args.markdown:
            _write(args.markdown, text)
        if args.plot:
            if doc["kind"] in ("accuracy", "tracking"):
                raise UsageError(f"--plot draws latency documents; {doc['kind']} has markdown and JSON")
            report.plot(doc, args.plot)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the user; a traceback helps nobody at a terminal
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: {type(exc).__name__}: {message}", file=sys.stderr)
        return EXIT_FAILED
    print(text)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
