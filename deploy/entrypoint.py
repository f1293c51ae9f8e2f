"""Container entrypoint: validate the bundle, build TensorRT engines once, then serve.

``python -m deploy.entrypoint`` is what ``Dockerfile.l4t`` and ``Dockerfile.cpu`` run. In order:

1. A tiny status server binds the server's port at once, so ``/healthz`` answers 200 and
   ``/readyz`` answers 503 ``{"state": "starting"}`` from the first second (Docker's healthcheck
   and a user's ``curl`` see *why* it is not ready instead of "connection refused").
2. The bundle is validated with :class:`engines.bundle.Bundle` (manifest + sha256 of every file).
   A bad bundle is a configuration error: a one-line message and exit code 2, no build attempted.
3. Engines are built under an exclusive ``fcntl.flock`` on ``<engines dir>/.build.lock`` while
   ``/readyz`` reports ``building_engines``. Two containers sharing the engines volume build
   once: the second blocks on the lock, then runs the builder, which finds the plans the first
   wrote (plans are named by key, so an up-to-date plan is skipped) and returns at once.
4. The graphs are loaded once, as the server will load them (``python -m server --check``: ONNX
   Runtime sessions or TensorRT plans, the tokenizer, the manifest's wiring), while ``/readyz``
   reports ``loading``. A bundle whose files match their sha256 but do not load (a corrupt file
   hashed as it is, a mistyped manifest) exits with code 2 and the checker's one line, instead of
   a server that would stay ``failed``.
5. The status server is closed and the process ``exec``s the real server (``python -m server``),
   which takes the port and reports ``loading`` then ``ready`` on its own ``/readyz``. ``exec``
   (not a child process) so SIGTERM from ``docker stop`` reaches uvicorn's graceful shutdown.

The readiness hand-over needs nothing from the server beyond the states it already reports:
the entrypoint owns the port only while the server is not running yet.

If the TensorRT build fails and ``SAM3_ALLOW_ORT_FALLBACK=1``, the server is started with
``--backend onnxruntime`` after a loud warning (ONNX Runtime uses the CUDA EP where the image has
the GPU build of onnxruntime, else the CPU). Without the flag the container exits with code 3 so
the failure is visible (``docker compose ps`` shows it restarting) rather than silently slow.

The builder, checker and server commands are injectable (``SAM3_ENGINE_BUILD_CMD``,
``SAM3_CHECK_CMD``, ``SAM3_SERVE_CMD`` or ``--build-cmd``/``--check-cmd``/``--serve-cmd``) so tests
run this logic outside Docker with short commands.
``python -m deploy.entrypoint healthcheck`` is the Docker ``HEALTHCHECK``: exit 0 only when the
server's ``/readyz`` answers 200.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import http.server
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from engines.factory import BACKEND_KINDS, PLAN_PRECISIONS

log = logging.getLogger("sam3.entrypoint")

# Exit codes: distinct so an operator (or a test) can tell the failures apart from the status.
EXIT_OK = 0
EXIT_USAGE = 1  # bad flag/env value, port already taken
EXIT_BUNDLE = 2  # bundle missing, malformed, corrupt or not loadable
EXIT_BUILD = 3  # engine build failed and the ORT fallback is not allowed
EXIT_ENGINES_DIR = 4  # engines directory cannot be created or written
EXIT_SIGNAL = 143  # stopped by SIGTERM/SIGINT before serving (128 + 15, like a shell)

# Readiness states, the same words the server's /readyz uses.
STARTING, BUILDING, LOADING, READY, FAILED = "starting", "building_engines", "loading", "ready", "failed"

LOCK_FILE = ".build.lock"
# The runtime's own names (triton: no engines here, docs/triton.md).
BACKENDS, PRECISIONS = BACKEND_KINDS, PLAN_PRECISIONS

# Environment variables. The first group is the server's (server/settings.py, prefix SAM3_):
# the entrypoint reads them with the same names and defaults so both agree on the bundle, port
# and engines directory. tests/deploy/test_deploy_files.py checks every SAM3_* name in the
# Dockerfiles, docker-compose.yml and docs against Settings plus ENTRYPOINT_ENV.
SERVER_ENV = (
    "SAM3_BUNDLE",
    "SAM3_BACKEND",
    "SAM3_HOST",
    "SAM3_PORT",
    "SAM3_API_KEY",
    # Shared with the server and the builder: where plans and the timing cache live (the bundle
    # is mounted read-only in the container), and which precision's plan to build and load.
    "SAM3_ENGINES_DIR",
    "SAM3_PRECISION",
)
# Read by the entrypoint only (the server ignores them: its Settings has extra="ignore").
ENTRYPOINT_ENV = (
    "SAM3_ALLOW_ORT_FALLBACK",  # 1: a failed TensorRT build serves with ONNX Runtime instead
    "SAM3_BUILD_WORKSPACE_MB",  # builder --workspace-mb (Orin Nano: lower it if the build OOMs)
    "SAM3_BUILD_LOCK_TIMEOUT_S",  # give up waiting for another container's build (default: wait)
    "SAM3_ENGINE_BUILD_CMD",  # replaces `python -m engines build ...` (tests, custom builders)
    "SAM3_CHECK_CMD",  # replaces `python -m server --check ...` (tests)
    "SAM3_SERVE_CMD",  # replaces `python -m server ...` (tests)
)

DEFAULT_PORT = 8000
DEFAULT_HOST = "127.0.0.1"


@dataclass
class Config:
    bundle: Path
    engines_dir: Path
    backend: str = "auto"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    precision: str = "fp16"
    workspace_mb: int | None = None
    allow_ort_fallback: bool = False
    lock_timeout_s: float | None = None
    build_cmd: list[str] | None = None
    check_cmd: list[str] | None = None
    serve_cmd: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_args(cls, argv: Sequence[str] | None, env: Mapping[str, str]) -> Config:
        parser = argparse.ArgumentParser(
            prog="python -m deploy.entrypoint", description=__doc__.split("\n")[0]
        )
        parser.add_argument("command", nargs="?", default="run", choices=("run", "healthcheck"))
        parser.add_argument("--bundle", default=env.get("SAM3_BUNDLE"))
        parser.add_argument("--engines-dir", default=env.get("SAM3_ENGINES_DIR"))
        parser.add_argument("--backend", default=env.get("SAM3_BACKEND", "auto"), choices=BACKENDS)
        parser.add_argument("--host", default=env.get("SAM3_HOST", DEFAULT_HOST))
        parser.add_argument("--port", type=int, default=_int(env, "SAM3_PORT", DEFAULT_PORT))
        parser.add_argument("--precision", default=env.get("SAM3_PRECISION", "fp16"), choices=PRECISIONS)
        parser.add_argument("--workspace-mb", type=int, default=_int(env, "SAM3_BUILD_WORKSPACE_MB", None))
        parser.add_argument("--build-cmd", default=env.get("SAM3_ENGINE_BUILD_CMD"))
        parser.add_argument("--check-cmd", default=env.get("SAM3_CHECK_CMD"))
        parser.add_argument("--serve-cmd", default=env.get("SAM3_SERVE_CMD"))
        args = parser.parse_args(argv)
        if args.command == "healthcheck":
            raise SystemExit(healthcheck(args.host, args.port, env.get("SAM3_API_KEY")))
        if not args.bundle:
            parser.error("no bundle: set SAM3_BUNDLE (the container mounts it at /bundle) or pass --bundle")
        bundle = Path(args.bundle)
        timeout = env.get("SAM3_BUILD_LOCK_TIMEOUT_S")
        return cls(
            bundle=bundle,
            # Default as the builder's: BUNDLE/engines (engines.bundle.ENGINES_DIR).
            engines_dir=Path(args.engines_dir) if args.engines_dir else bundle / "engines",
            backend=args.backend,
            host=args.host,
            port=args.port,
            precision=args.precision,
            workspace_mb=args.workspace_mb,
            allow_ort_fallback=_truthy(env.get("SAM3_ALLOW_ORT_FALLBACK", "")),
            lock_timeout_s=float(timeout) if timeout else None,
            build_cmd=shlex.split(args.build_cmd) if args.build_cmd else None,
            check_cmd=shlex.split(args.check_cmd) if args.check_cmd else None,
            serve_cmd=shlex.split(args.serve_cmd) if args.serve_cmd else None,
            env=dict(env),
        )

    def builder_command(self) -> list[str]:
        if self.build_cmd:
            return list(self.build_cmd)
        # --engines-dir duplicates SAM3_ENGINES_DIR (also in the env) so the logged command says
        # where the plans go.
        cmd = [sys.executable, "-m", "engines", "build", str(self.bundle), "--precision", self.precision]
        cmd += ["--engines-dir", str(self.engines_dir)]
        if self.workspace_mb:
            cmd += ["--workspace-mb", str(self.workspace_mb)]
        return cmd

    def check_command(self, backend: str) -> list[str] | None:
        """``python -m server ... --check``; None when the server command is replaced (tests) and
        no checker is given: there is no real server to load the graphs with."""
        if self.check_cmd:
            return list(self.check_cmd)
        if self.serve_cmd:
            return None
        return [*self.server_command(backend), "--check"]

    def server_command(self, backend: str) -> list[str]:
        if self.serve_cmd:
            return list(self.serve_cmd)
        return [
            sys.executable, "-m", "server", "--bundle", str(self.bundle), "--backend", backend,
            "--host", self.host, "--port", str(self.port),
        ]  # fmt: skip

    def child_env(self, backend: str) -> dict[str, str]:
        """The environment the builder and the server see: resolved values, one truth."""
        env = dict(self.env)
        env.update(
            SAM3_BUNDLE=str(self.bundle),
            SAM3_ENGINES_DIR=str(self.engines_dir),
            SAM3_BACKEND=backend,
            SAM3_HOST=self.host,
            SAM3_PORT=str(self.port),
            SAM3_PRECISION=self.precision,
        )
        return env


# --------------------------------------------------------------------------- status server


class StatusServer:
    """Answers /healthz and /readyz on the server's port until the server takes it over."""

    def __init__(self, host: str, port: int) -> None:
        self.state = STARTING
        self.detail = ""
        status = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    self._send(200, {"status": "ok"})
                elif path == "/readyz":
                    body = {"state": status.state}
                    if status.detail:
                        body["detail"] = status.detail
                    self._send(503, body)
                else:
                    # Same error shape as the server's, so clients need one parser.
                    self._send(503, {"error": {"code": "not_ready", "message": f"server is {status.state}"}})

            do_POST = do_DELETE = do_PUT = do_GET

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if code == 503:
                    self.send_header("Retry-After", "10")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass  # healthchecks every few seconds would drown the build log

        self._httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        # Join in-flight answers on close: exec() would otherwise cut a response mid-write.
        self._httpd.daemon_threads = False
        self._httpd.block_on_close = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="status", daemon=True)

    def start(self) -> StatusServer:
        self._thread.start()
        return self

    def set(self, state: str, detail: str = "") -> None:
        self.state, self.detail = state, detail
        log.info("state: %s%s", state, f" ({detail})" if detail else "")

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()  # frees the port for the server we exec next


# --------------------------------------------------------------------------- build under a lock


class LockTimeout(Exception):
    pass


def acquire_build_lock(
    engines_dir: Path, timeout_s: float | None, on_wait: Callable[[str], None] | None = None
) -> int:
    """Exclusive flock on ``engines_dir/.build.lock``; returns the fd (closing it releases).

    flock is per open file description and dies with the process, so a container killed
    mid-build never leaves a stale lock behind (unlike a lock *file* that must be deleted).
    It works across containers that share a local named volume (same kernel); NFS may not
    honour it.
    """
    path = engines_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    waited = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
        if not waited:
            waited = True
            holder = path.read_text(errors="replace").strip() or "unknown"
            if on_wait:
                on_wait(holder)
        if deadline is not None and time.monotonic() > deadline:
            os.close(fd)
            raise LockTimeout(f"{path} still held after {timeout_s:.0f} s")
        time.sleep(0.2)
    # Record who builds, for the "waiting for ..." message of the next container.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
    return fd


def tensorrt_importable() -> bool:
    """An installed TensorRT package (a cheap check: no import, no CUDA context in this process)."""
    from engines.tensorrt_build import tensorrt_installed

    return tensorrt_installed()


class Entrypoint:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.status: StatusServer | None = None
        self._child: subprocess.Popen[Any] | None = None
        self._stopping = False

    # The container's PID 1 (under `init: true`, its only child): without a handler Python
    # would ignore SIGTERM as PID 1 and `docker stop` would wait 10 s then SIGKILL mid-build.
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stopping = True
        log.warning("signal %d: stopping", signum)
        if self._child and self._child.poll() is None:
            self._child.terminate()
        else:
            raise SystemExit(EXIT_SIGNAL)

    def run(self) -> int:
        cfg = self.config
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            self.status = StatusServer(cfg.host, cfg.port).start()
        except OSError as exc:
            log.error("cannot bind %s:%d (%s): is another server using the port?", cfg.host, cfg.port, exc)
            return EXIT_USAGE
        try:
            code, backend = self.prepare()
        except SystemExit:
            self._close_status()
            raise
        if code != EXIT_OK:
            self._close_status()
            return code
        self.status.set(LOADING)
        code = self.check(backend)
        self._close_status()
        if code != EXIT_OK:
            return code
        cmd = cfg.server_command(backend)
        log.info("serving: %s", shlex.join(cmd))
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvpe(cmd[0], cmd, cfg.child_env(backend))
        return EXIT_OK  # not reached

    def _close_status(self) -> None:
        if self.status:
            self.status.close()
            self.status = None

    def _fail(self, code: int, message: str) -> tuple[int, str]:
        assert self.status
        self.status.set(FAILED, message)
        log.error("%s", message)
        return code, ""

    def prepare(self) -> tuple[int, str]:
        """Validate and build; returns (exit code, backend the server should use).

        Whether to build is the runtime's own backend decision (engines.factory.resolve_backend,
        which the server makes again when it starts, with the same answer). The entrypoint only
        probes more cheaply: TensorRT counts as present when it is installed (or a builder
        command is injected), without opening a CUDA context in this process. A Jetson container
        started without the NVIDIA runtime therefore tries the build, and the builder says why
        it cannot, instead of the server quietly falling back to the CPU.
        """
        cfg = self.config
        # torch-free; imported late so --help works anywhere
        from engines.bundle import Bundle
        from engines.errors import BackendUnavailable, BundleError
        from engines.factory import resolve_backend

        log.info("validating bundle %s (manifest + sha256 of every file)", cfg.bundle)
        try:
            bundle = Bundle(cfg.bundle)
        except BundleError as exc:
            return self._fail(EXIT_BUNDLE, f"invalid bundle at {cfg.bundle}: {exc}")
        log.info("bundle %r ok", bundle.manifest.name)

        try:
            choice = resolve_backend(
                bundle.manifest, cfg.backend,
                present={"tensorrt": cfg.build_cmd is not None or tensorrt_importable()},
            )  # fmt: skip
        except BackendUnavailable as exc:
            return self._fail(EXIT_USAGE, f"backend {cfg.backend}: {exc}")
        if choice.kind != "tensorrt":
            log.info("%s: no TensorRT engines to build", choice.reason)
            return EXIT_OK, cfg.backend

        try:
            cfg.engines_dir.mkdir(parents=True, exist_ok=True)
            probe = cfg.engines_dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            return self._fail(
                EXIT_ENGINES_DIR,
                f"engines directory {cfg.engines_dir} is not writable ({exc.strerror or exc}); the bundle is "
                "mounted read-only in the container, so set SAM3_ENGINES_DIR to a writable volume",
            )

        status = self.status
        assert status is not None
        status.set(BUILDING, "waiting for the build lock")

        def on_wait(holder: str) -> None:
            status.set(BUILDING, f"another process is building engines ({holder}); waiting")

        try:
            lock_fd = acquire_build_lock(cfg.engines_dir, cfg.lock_timeout_s, on_wait)
        except LockTimeout as exc:
            return self._build_failed(f"timed out waiting for the engine build lock: {exc}")
        try:
            status.set(BUILDING, f"precision {cfg.precision}")
            started = time.monotonic()
            returncode = self._run_builder()
            elapsed = time.monotonic() - started
        finally:
            os.close(lock_fd)  # releases the flock: a waiting container goes on now
        if self._stopping:
            raise SystemExit(EXIT_SIGNAL)
        if returncode != 0:
            # The builder exits 2 when it finds no GPU or no TensorRT: on a Jetson that means the
            # container was started without the NVIDIA runtime, the commonest setup mistake.
            hint = ": the builder saw no GPU or TensorRT; is the container started with `runtime: nvidia`?"
            return self._build_failed(
                f"engine build failed with exit code {returncode}{hint if returncode == 2 else ''}"
            )
        plans = sorted(p.name for p in cfg.engines_dir.glob("*.plan"))
        log.info("engines ready after %.1f s in %s: %s", elapsed, cfg.engines_dir, ", ".join(plans) or "none")
        return EXIT_OK, cfg.backend

    def check(self, backend: str) -> int:
        """Load the graphs as the server will (``python -m server --check``), in a child process
        that exits before the server starts: an 8 GB device never holds the model twice."""
        cmd = self.config.check_command(backend)
        if cmd is None:
            log.info("SAM3_SERVE_CMD replaces the server: no graph check")
            return EXIT_OK
        log.info("loading the graphs: %s", shlex.join(cmd))
        child: subprocess.Popen[str] = subprocess.Popen(
            cmd, env=self.config.child_env(backend), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self._child = child
        try:
            out, err = child.communicate()
            returncode = child.returncode
        finally:
            self._child = None
        if self._stopping:
            raise SystemExit(EXIT_SIGNAL)
        if returncode == 0:
            log.info("%s", (out.strip().splitlines() or ["graphs loaded"])[-1])
            return EXIT_OK
        reason = (err.strip().splitlines() or out.strip().splitlines() or [f"exit code {returncode}"])[-1]
        code, _ = self._fail(EXIT_BUNDLE, f"the bundle at {self.config.bundle} does not load: {reason}")
        return code

    def _run_builder(self) -> int:
        cfg = self.config
        cmd = cfg.builder_command()
        log.info("building engines: %s", shlex.join(cmd))
        # The lock fd is not inherited (close_fds): if this process dies, the lock goes with it.
        self._child = subprocess.Popen(cmd, env=cfg.child_env(cfg.backend), stdin=subprocess.DEVNULL)
        try:
            return self._child.wait()
        finally:
            self._child = None

    def _build_failed(self, message: str) -> tuple[int, str]:
        if not self.config.allow_ort_fallback:
            return self._fail(
                EXIT_BUILD, message + "; set SAM3_ALLOW_ORT_FALLBACK=1 to serve with ONNX Runtime"
            )
        banner = "!" * 78
        log.warning(
            "\n%s\n%s\nFALLING BACK TO ONNX RUNTIME (SAM3_ALLOW_ORT_FALLBACK=1): expect several times the\n"
            "latency of TensorRT FP16, and CPU-only speed unless the image has the GPU onnxruntime build.\n%s",
            banner, message, banner,
        )  # fmt: skip
        return EXIT_OK, "onnxruntime"


# --------------------------------------------------------------------------- healthcheck


def healthcheck(host: str, port: int, api_key: str | None = None, timeout_s: float = 4.0) -> int:
    """Exit status for Docker's HEALTHCHECK: 0 when /readyz answers 200, else 1."""
    target = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    if ":" in target:
        target = f"[{target}]"
    request = urllib.request.Request(f"http://{target}:{port}/readyz")
    if api_key:
        request.add_header("X-API-Key", api_key)  # harmless if /readyz is public, needed if not
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            print(response.read(200).decode(errors="replace"))
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as exc:
        print(f"{exc.code} {exc.read(200).decode(errors='replace')}")
        return 1
    except OSError as exc:
        print(f"unreachable: {exc}")
        return 1


def _int(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    value = env.get(name, "")
    if not value.strip():
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"{name}={value!r} is not an integer") from None


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="[entrypoint] %(levelname)s %(message)s", stream=sys.stderr
    )
    config = Config.from_args(argv, os.environ)
    return Entrypoint(config).run()


if __name__ == "__main__":
    sys.exit(main())
