"""``python -m server --bundle DIR [--backend ...] [--host H] [--port P]``.

Flags override ``SAM3_*`` environment variables, which override defaults (server/settings.py).
uvicorn runs the app with its lifespan on, so SIGTERM stops accepting connections, waits up to
``SAM3_SHUTDOWN_TIMEOUT_S`` for open requests, then drains the inference queue.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from pydantic import ValidationError


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    from server.app import create_app
    from server.settings import Settings

    parser = argparse.ArgumentParser(prog="python -m server", description="SAM3 segmentation server")
    parser.add_argument("--bundle", help="bundle directory (env SAM3_BUNDLE)")
    parser.add_argument("--backend", choices=("auto", "tensorrt", "onnxruntime", "triton"), help="env SAM3_BACKEND")
    parser.add_argument("--triton-url", help="backend triton: gRPC host:port of the Triton server (env SAM3_TRITON_URL)")
    parser.add_argument("--host", help="bind address (env SAM3_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (env SAM3_PORT, default 8000)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"python -m server: invalid settings: {exc}", file=sys.stderr)
        return 1
    if settings.bundle is None:
        parser.error("no bundle: pass --bundle DIR or set SAM3_BUNDLE")
    if not settings.bundle.is_dir():
        print(f"python -m server: bundle directory {settings.bundle} does not exist", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s) or None,
        access_log=settings.log_level == "debug",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
