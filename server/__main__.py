"""``python -m server --bundle DIR [--backend ...] [--host H] [--port P] [--log-level L] [--check]``.

Flags override ``SAM3_*`` environment variables, which override defaults (server/settings.py).
uvicorn runs the app with its lifespan on, so SIGTERM stops accepting connections, waits up to
``SAM3_SHUTDOWN_TIMEOUT_S`` for open requests, then drains the inference queue.

Fail fast: a bundle that cannot be loaded stops the process with exit code 2 and one line on
stderr naming the file and the reason (the traceback only with ``--log-level debug``), instead of
a server that stays "failed". ``--check`` loads the bundle exactly as serving would, then exits
(0, or 2 with that line): the container entrypoint runs it before it hands the port over.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Sequence

from pydantic import ValidationError

if TYPE_CHECKING:
    from server.settings import Settings

EXIT_SETTINGS = 1
EXIT_BUNDLE = 2  # the bundle is missing or cannot be loaded

# glibc mallopt parameters
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8


def bound_the_allocator() -> None:
    """Freed images go back to the OS, so RSS follows what requests hold.

    glibc gives each thread its own heap arena and raises its mmap threshold after large frees, so
    decode and mask buffers freed on the CPU threads stay in the process: a 64-upload burst peaked
    at +245 MB with glibc's defaults and +149 MB with these (benchmarks/hostile.py). Set before any
    thread starts; MALLOC_ARENA_MAX / MALLOC_MMAP_THRESHOLD_ in the environment win.
    """
    import ctypes
    import os

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc
    if "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(_M_ARENA_MAX, 2)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    from engines.factory import BACKEND_KINDS
    from server.app import create_app
    from server.protocol import with_header_timeout
    from server.settings import Settings

    parser = argparse.ArgumentParser(prog="python -m server", description="SAM3 segmentation server")
    parser.add_argument("--bundle", help="bundle directory (env SAM3_BUNDLE)")
    parser.add_argument("--backend", choices=BACKEND_KINDS, help="env SAM3_BACKEND")
    parser.add_argument("--triton-url", help="backend triton: gRPC host:port of the Triton server (env SAM3_TRITON_URL)")
    parser.add_argument("--host", help="bind address (env SAM3_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (env SAM3_PORT, default 8000)")
    parser.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"),
                        help="env SAM3_LOG_LEVEL (debug adds tracebacks and access logs)")
    parser.add_argument("--check", action="store_true", help="load the bundle as serving would, then exit")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k != "check"}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"python -m server: invalid settings: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_SETTINGS
    if settings.bundle is None:
        parser.error("no bundle: pass --bundle DIR or set SAM3_BUNDLE")
    if not settings.bundle.is_dir():
        print(f"python -m server: bundle directory {settings.bundle} does not exist", file=sys.stderr)
        return EXIT_BUNDLE
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bound_the_allocator()
    # The event loop (admission, probes) waits for the GIL behind the CPU threads: handing it over
    # every 1 ms instead of 5 cut the median 429 of a 64-upload burst on one core from 134 to 80 ms.
    sys.setswitchinterval(0.001)
    if args.check:
        return check(settings)

    failure: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_failure(message: str) -> None:  # on the worker thread
        failure.append(message)
        if server is not None:
            server.should_exit = True  # uvicorn polls it: a graceful stop, then we exit 2

    app = create_app(settings, on_load_failure=on_load_failure)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s) or None,
        access_log=settings.log_level == "debug",
        http=with_header_timeout(settings.header_timeout_s),
    )
    server = uvicorn.Server(config)
    server.run()
    if failure:
        print(f"python -m server: cannot load bundle {settings.bundle}: {failure[0]}", file=sys.stderr)
        return EXIT_BUNDLE
    return 0


def check(settings: Settings) -> int:
    """Load the pipeline as the server would (same settings, no warm-up), close it, report."""
    from server.app import load_pipeline

    try:
        pipeline = load_pipeline(settings, lambda state: None)
    except Exception as exc:  # noqa: BLE001 - reported as one line; the traceback at debug
        logging.getLogger("server").debug("bundle check failed", exc_info=exc)
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        print(f"python -m server: cannot load bundle {settings.bundle}: {reason}", file=sys.stderr)
        return EXIT_BUNDLE
    try:
        print(f"bundle {settings.bundle} loads: {pipeline.manifest.name} on {pipeline.backend.kind} "
              f"({pipeline.backend.precision})")
    finally:
        pipeline.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
