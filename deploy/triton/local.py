"""A real ``tritonserver`` on this machine, from PyPI's ``nvidia-pytriton`` wheel (no Docker, no GPU).

The wheel ships Triton Inference Server (2.51, release 24.10) with its Python backend and one
backend stub per Python version. We use the binary, not PyTriton's Python API: the repository
is the one ``python -m export triton`` writes. The wheel is installed with ``--no-deps``
(requirements/tritonserver.txt): its Python package pins numpy < 2, which only its own Python
API needs.

What running it takes (each found the hard way):
- the stub embeds Python: ``libpython3.X.so`` of THIS interpreter on ``LD_LIBRARY_PATH`` (else
  it picks the system's), and this environment's ``bin`` first on ``PATH`` (the embedded
  interpreter finds its ``sys.prefix``, hence this venv's site-packages, by looking ``python3``
  up on ``PATH``; ``PYTHONPATH`` is ignored);
- the stub for this Python version copied to ``BACKENDS/python/triton_python_backend_stub``.

    python -m deploy.triton.local REPOSITORY [--grpc-port 8001 --http-port 8000 --metrics-port 8002]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Sequence

INSTALL_HINT = "pip install --no-deps -r requirements/tritonserver.txt"


class TritonUnavailable(RuntimeError):
    """No usable tritonserver here; the message says why (the tests skip with it)."""


def pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")  # locates the package without importing it (numpy<2 pin)
    if spec is None or not spec.submodule_search_locations:
        raise TritonUnavailable(f"nvidia-pytriton is not installed ({INSTALL_HINT})")
    return Path(list(spec.submodule_search_locations)[0])


def find_tritonserver() -> tuple[Path, Path, Path, Path]:
    """(tritonserver binary, its bundled libs dir, python backend dir, stub for this Python)."""
    root = pytriton_root()
    dist = root / "tritonserver"
    binary = dist / "bin" / "tritonserver"
    libs = root.parent / "nvidia_pytriton.libs"
    backend = dist / "backends" / "python"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    for path, what in ((binary, "tritonserver binary"), (backend / "libtriton_python.so", "Python backend"),
                       (stub, f"Python {version} backend stub")):
        if not path.is_file():
            raise TritonUnavailable(f"the nvidia-pytriton wheel here has no {what} ({path})")
    if not os.access(binary, os.X_OK):
        raise TritonUnavailable(f"{binary} is not executable")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise TritonUnavailable("this Python is built without libpython.so, which the Python backend stub loads")
    return binary, libs, backend, stub


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalTriton:
    """``tritonserver`` as a child process; a context manager that always stops it."""

    def __init__(
        self,
        repository: str | Path,
        *,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        log_path: str | Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.repository = Path(repository)
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.extra_args = list(extra_args)
        self._workdir = Path(tempfile.mkdtemp(prefix="sam3-triton-"))
        self.log_path = Path(log_path) if log_path else self._workdir / "tritonserver.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self) -> tuple[list[str], dict[str, str]]:
        binary, libs, backend, stub = find_tritonserver()
        backends = self._workdir / "backends"
        python_dir = backends / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        for item in backend.iterdir():
            target = python_dir / item.name
            if not target.exists():
                target.symlink_to(item)
        shutil.copy2(stub, python_dir / "triton_python_backend_stub")
        env = dict(os.environ)
        libdir = str(sysconfig.get_config_var("LIBDIR") or "")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        env.pop("PYTHONHOME", None)
        args = [
            str(binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            # Loopback only: this is a developer's / the tests' server.
            "--grpc-address=127.0.0.1",
            "--http-address=127.0.0.1",
            "--metrics-address=127.0.0.1",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--exit-on-error=true",
            "--strict-readiness=true",
            # Tensors cross into the stub through /dev/shm: grow by 16 MB, not the default 1 MB.
            "--backend-config=python,shm-default-byte-size=16777216",
            "--backend-config=python,shm-growth-byte-size=16777216",
            "--log-verbose=0",
            *self.extra_args,
        ]
        return args, env

    def start(self, timeout_s: float = 120.0) -> "LocalTriton":
        args, env = self.command()
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"tritonserver not ready after {timeout_s:g} s:\n{self.log_tail()}")

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            return response.read().decode("utf-8")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crash would: no graceful shutdown."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self._workdir / "backends", ignore_errors=True)

    def __enter__(self) -> "LocalTriton":
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parse_metric(text: str, name: str, model: str) -> float:
    """One Prometheus counter of one model from Triton's /metrics text (0 when absent)."""
    prefix = f'{name}{{model="{model}"'
    total = 0.0
    for line in text.splitlines():
        if line.startswith(prefix):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.triton.local", description=__doc__.splitlines()[0])
    parser.add_argument("repository", type=Path)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    args = parser.parse_args(argv)
    if not (args.repository / ".sam3-repository.json").is_file() and not args.repository.is_dir():
        print(f"error: {args.repository} is not a model repository", file=sys.stderr)
        return 2
    try:
        server = LocalTriton(args.repository, grpc_port=args.grpc_port, http_port=args.http_port,
                             metrics_port=args.metrics_port)
        server.start()
    except (TritonUnavailable, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    def stop_on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops tritonserver too (it runs in its own session)

    signal.signal(signal.SIGTERM, stop_on_term)
    print(f"tritonserver ready: gRPC {server.grpc_url}, HTTP {server.http_url}, metrics {server.metrics_url} "
          f"(log {server.log_path}); Ctrl-C stops it", flush=True)
    try:
        while server.process is not None and server.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
