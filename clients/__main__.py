"""``python -m clients``: segment | embed | stream | health against a running server.

    python -m clients segment http://127.0.0.1:8000 photo.jpg "a dog" "a ball" --out overlay.png
    python -m clients embed http://127.0.0.1:8000 photo.jpg
    python -m clients stream http://127.0.0.1:8000 rtsp://cam1.lan/live "person" --out annotated.mp4

Every failure is one line on stderr (``error: <what>``) and a non-zero exit: 2 usage/input
(bad file, bad option), 3 server unreachable or timed out, 1 the server refused (4xx/5xx).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from clients.client import DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, Sam3Client
from clients.errors import ApiError, ClientError, RequestTimeout, ServerUnreachable
from clients.wire import Exemplar

EXIT_OK, EXIT_API, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
MASK_FORMATS = ("rle", "png", "polygon", "none")


SHOWN_DETECTIONS = 10  # per prompt on the terminal; --json has them all


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clients", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
        p.add_argument("--api-key", default=os.environ.get("SAM3_API_KEY"), help="X-API-Key (default $SAM3_API_KEY)")
        p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per request")
        p.add_argument("--retries", type=int, default=DEFAULT_RETRIES, help="retries on 429/503 (Retry-After)")

    seg = sub.add_parser("segment", help="segment an image with text prompts and/or exemplar boxes")
    common(seg)
    seg.add_argument("image", help="image file")
    seg.add_argument("prompts", nargs="*", help="text prompts; with --box/--negative-box at most one, which the boxes join")
    seg.add_argument("--box", action="append", type=_box, default=[], metavar="x0,y0,x1,y1",
                     help="exemplar box in image pixels: find everything like it (repeatable)")
    seg.add_argument("--negative-box", action="append", type=_box, default=[], metavar="x0,y0,x1,y1",
                     help="exemplar box of what NOT to find (repeatable; needs a text or a --box)")
    seg.add_argument("--score-threshold", type=float, default=None)
    seg.add_argument("--mask-threshold", type=float, default=None)
    seg.add_argument("--max-detections", type=int, default=None)
    seg.add_argument("--mask-format", choices=MASK_FORMATS, default="rle")
    seg.add_argument("--out", default=None, help="overlay PNG with masks, boxes and labels")
    seg.add_argument("--json", dest="json_out", default=None, help="write the server's response JSON here")
    seg.set_defaults(func=cmd_segment)

    emb = sub.add_parser("embed", help="compute and cache an image embedding; prints its image_id")
    common(emb)
    emb.add_argument("image", help="image file")
    emb.set_defaults(func=cmd_embed)

    stream = sub.add_parser("stream", help="segment and track a video source on the server; print or record it")
    common(stream)
    stream.add_argument("source", help="rtsp/rtsps/http(s) URL, /dev/videoN, or a file name under the server's "
                                       "SAM3_MEDIA_DIR")
    stream.add_argument("prompts", nargs="*", help="text prompts; with --box at most one, which the boxes join")
    stream.add_argument("--box", action="append", type=_box, default=[], metavar="x0,y0,x1,y1",
                        help="exemplar box on the first frame: track everything like it (repeatable)")
    stream.add_argument("--negative-box", action="append", type=_box, default=[], metavar="x0,y0,x1,y1",
                        help=argparse.SUPPRESS)
    stream.add_argument("--max-fps", type=float, default=None, help="frames processed per second at most")
    stream.add_argument("--score-threshold", type=float, default=None)
    stream.add_argument("--frames", type=int, default=None, help="stop after this many processed frames")
    stream.add_argument("--json", dest="json_out", default=None, help="write every event here, one JSON per line")
    stream.add_argument("--out", default=None, help="record the server's overlay to this .mp4 (needs PyAV)")
    stream.set_defaults(func=cmd_stream)

    health = sub.add_parser("health", help="is the server up and ready?")
    common(health)
    health.set_defaults(func=cmd_health)
    return parser


def _box(text: str) -> tuple[float, float, float, float]:
    """``x0,y0,x1,y1`` -> four floats (the server checks they make a box inside the image)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a box is x0,y0,x1,y1 in pixels, got {text!r}") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"a box is x0,y0,x1,y1 in pixels, got {text!r}")
    return values[0], values[1], values[2], values[3]


def _prompts(args: argparse.Namespace) -> list[str | Exemplar]:
    if not (args.box or args.negative_box):
        if not args.prompts:
            raise UsageError("give a text prompt, --box, or both")
        return list(args.prompts)
    if len(args.prompts) > 1:
        raise UsageError("--box/--negative-box make one prompt: give at most one text prompt with them")
    return [Exemplar(boxes=args.box, negative=args.negative_box, text=args.prompts[0] if args.prompts else None)]


def _client(args: argparse.Namespace) -> Sam3Client:
    return Sam3Client(args.url, api_key=args.api_key, timeout=args.timeout, retries=args.retries)


def _read_image(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read image {path}: {exc.strerror or exc}") from None


class UsageError(Exception):
    """A local problem (file, option) found before any request."""


def cmd_segment(args: argparse.Namespace) -> int:
    if args.out is not None and not args.out.lower().endswith(".png"):
        raise UsageError(f"--out must name a .png file, got {args.out!r}")
    prompts = _prompts(args)
    data = _read_image(args.image)
    with _client(args) as client:
        response = client.segment(
            data,
            prompts,
            score_threshold=args.score_threshold,
            mask_threshold=args.mask_threshold,
            max_detections=args.max_detections,
            mask_format=args.mask_format,
        )
    if args.json_out:
        _write(args.json_out, json.dumps(response.raw, indent=2).encode())
    if args.out:
        from clients.overlay import draw_overlay, load_rgb

        overlay = draw_overlay(load_rgb(data), response.results)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        overlay.save(args.out, format="PNG")
    width, height = response.image_size
    print(f"image {response.image_id[:12]} {width}x{height} cache_hit={response.cache_hit} "
          f"total {response.timings_ms.get('total', 0.0):.1f} ms ({response.model.get('backend', '?')})")
    for result in response.results:
        print(f"  {result.prompt!r}: {len(result.detections)} detection(s)")
        for det in result.detections[:SHOWN_DETECTIONS]:
            box = ", ".join(f"{v:.1f}" for v in det.box)
            print(f"    {det.score:.3f}  [{box}]")
        if len(result.detections) > SHOWN_DETECTIONS:
            print(f"    ... {len(result.detections) - SHOWN_DETECTIONS} more (all of them in --json)")
    return EXIT_OK



def cmd_embed(args: argparse.Namespace) -> int:
    data = _read_image(args.image)
    with _client(args) as client:
        response = client.embed(data)
    width, height = response.image_size
    print(f"{response.image_id} {width}x{height} {'already cached' if response.cached else 'embedded'}")
    return EXIT_OK


def _source(text: str) -> dict[str, str]:
    if "://" in text:
        return {"url": text}
    if text.startswith("/dev/"):
        return {"device": text}
    return {"file": text}


def cmd_stream(args: argparse.Namespace) -> int:
    if args.out is not None and not args.out.lower().endswith(".mp4"):
        raise UsageError(f"--out must name a .mp4 file, got {args.out!r}")
    if args.frames is not None and args.frames < 1:
        raise UsageError("--frames must be >= 1")
    prompts = _prompts(args)
    with _client(args) as client:
        stream = client.start_stream(_source(args.source), prompts, max_fps=args.max_fps,
                                     score_threshold=args.score_threshold)
        print(f"stream {stream['id']} {stream['state']}: {stream['source']['value']} "
              f"(at most {stream['max_fps']:g} FPS); Ctrl-C stops it", flush=True)
        try:
            if args.out:
                count = _record(client, stream["id"], args.out, args.frames)
                print(f"wrote {count} frames to {args.out}")
            else:
                _print_events(client, stream["id"], args.frames, args.json_out)
        except KeyboardInterrupt:
            pass
        final = client.stop_stream(stream["id"])
    stats = final["stats"]
    print(f"{final['state']}{': ' + final['reason'] if final['reason'] else ''}; {stats['frames_processed']} frames "
          f"processed, {stats['frames_dropped']} dropped")
    return EXIT_OK if final["state"] != "failed" else EXIT_API


def _print_events(client: Sam3Client, stream_id: str, limit: int | None, json_out: str | None) -> None:
    sink = open(json_out, "w", encoding="utf-8") if json_out else None
    try:
        seen = 0
        for kind, event in client.stream_events(stream_id):
            if kind != "frame":
                break
            if sink:
                sink.write(json.dumps(event) + "\n")
            tracks = "  ".join(f"#{t['track_id']} {t['prompt']} {t['score']:.2f}" for t in event["tracks"])
            print(f"frame {event['frame']:5d} t={event['timestamp_s']:7.2f}s {event['latency_ms']:6.1f} ms  "
                  f"{tracks or '-'}", flush=True)
            seen += 1
            if limit is not None and seen >= limit:
                break
    finally:
        if sink:
            sink.close()


def _record(client: Sam3Client, stream_id: str, path: str, limit: int | None) -> int:
    try:
        import av
    except ImportError:
        raise UsageError("--out needs PyAV (pip install av)") from None
    import io

    import numpy as np
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with av.open(path, "w", format="mp4") as container:
        video = None
        for jpeg in client.stream_overlay(stream_id):
            frame = Image.open(io.BytesIO(jpeg)).convert("RGB")
            if video is None:
                video = container.add_stream("libx264", rate=int(client.stream(stream_id)["max_fps"]) or 10)
                video.width, video.height, video.pix_fmt = frame.width // 2 * 2, frame.height // 2 * 2, "yuv420p"
            if (frame.width // 2 * 2, frame.height // 2 * 2) != (video.width, video.height):
                continue  # the source changed size; the file keeps its first one
            pixels = np.asarray(frame.crop((0, 0, video.width, video.height)))
            picture = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in video.encode(picture):
                container.mux(packet)
            count += 1
            if limit is not None and count >= limit:
                break
        if video is not None:
            for packet in video.encode():
                container.mux(packet)
    return count


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        health = client.health()
    print(f"{health.status} state={health.state} ready={health.ready}")
    return EXIT_OK if health.ready else EXIT_API


def _write(path: str, data: bytes) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except (ServerUnreachable, RequestTimeout) as exc:
        return _fail(str(exc), EXIT_UNREACHABLE)
    except ApiError as exc:
        return _fail(str(exc), EXIT_API)
    except (ClientError, TypeError, OSError) as exc:
        return _fail(f"{type(exc).__name__}: {exc}", EXIT_API if isinstance(exc, ClientError) else EXIT_USAGE)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
