"""The container entrypoint, run outside Docker as the container would run it.

Each test starts ``python -m deploy.entrypoint`` as a subprocess on a free loopback port and
watches what an operator would: ``/readyz`` over HTTP, the exit code, the log. The TensorRT
builder is simulated by a short Python command (injected with SAM3_ENGINE_BUILD_CMD) that waits
on a gate file the test controls, so "while building" is observed without sleeps-and-hope, and
that is idempotent like the real builder: a plan that already exists is kept, not rebuilt.

The server is the real ``python -m server`` where that and the lead's ``tiny_bundle`` fixture
exist; the entrypoint contract (states, hand-over of the port, exec, env) is also checked with a
stand-in server so it is tested whatever state the server is in.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from deploy import entrypoint
from engines.bundle import (
    Manifest,
    ModelInfo,
    PartSpec,
    Preprocessing,
    SourceInfo,
    TensorSpec,
    TokenizerInfo,
    sha256_bytes,
    write_manifest,
)

REPO = Path(__file__).resolve().parents[2]
PLAN = "image_encoder.testkey.plan"

# The simulated builder: records each run in build.log ("build" or "skip") and writes the plan
# only if absent, as `python -m engines build` does for a plan whose key already exists.
BUILDER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    engines = Path(os.environ["SAM3_ENGINES_DIR"])
    gate = Path(sys.argv[1])
    log = engines / "build.log"
    plan = engines / "{plan}"
    (engines / "builder.pid").write_text(str(os.getpid()))
    if plan.exists():
        log.open("a").write("skip\\n")
        sys.exit(0)
    while not gate.exists():
        time.sleep(0.05)
    plan.write_text("built by " + sys.argv[2])
    log.open("a").write("build\\n")
    sys.exit(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    """
).format(plan=PLAN)

# Stand-in for `python -m server`: ready at once, and tells the test what it was handed.
STAND_IN_SERVER = textwrap.dedent(
    """
    import http.server, json, os
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"state": "ready", "pid": os.getpid(),
                               "backend": os.environ.get("SAM3_BACKEND"),
                               "engines_dir": os.environ.get("SAM3_ENGINES_DIR")}).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body)))
            self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", int(os.environ["SAM3_PORT"])), H).serve_forever()
    """
)


# --------------------------------------------------------------------------- helpers


def make_bundle(root: Path) -> Path:
    """A manifest-valid bundle of tiny dummy files: Bundle() checks the manifest and hashes only."""
    root.mkdir(parents=True)
    parts = {}
    for name in ("image_encoder", "text_encoder", "decoder"):
        data = f"not really onnx: {name}".encode()
        (root / f"{name}.onnx").write_bytes(data)
        parts[name] = PartSpec(
            name=name,
            file=f"{name}.onnx",
            sha256=sha256_bytes(data),
            inputs=(TensorSpec("x", "float32", ("batch", 4)),),
            outputs=(TensorSpec("y", "float32", ("batch", 4)),),
        )
    tok = b'{"dummy": "tokenizer"}'
    (root / "tokenizer.json").write_bytes(tok)
    manifest = Manifest(
        name="deploy-test",
        model=ModelInfo("sam3", image_size=28, patch_size=14, hidden_size=8, num_queries=4, mask_size=(8, 8)),
        preprocessing=Preprocessing(image_size=28),
        tokenizer=TokenizerInfo(
            "tokenizer.json", sha256_bytes(tok), context_length=32, pad_id=0, bos_id=1, eos_id=2
        ),
        parts=parts,
        source=SourceInfo(checkpoint="none", checkpoint_sha256="0" * 64, format="demo"),
    )
    write_manifest(root, manifest)
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def builder_cmd(tmp: Path, gate: Path, who: str, exit_code: int = 0) -> str:
    script = tmp / "fake_builder.py"
    script.write_text(BUILDER)
    return shlex.join([sys.executable, str(script), str(gate), who, str(exit_code)])


def stand_in_cmd(tmp: Path) -> str:
    script = tmp / "stand_in_server.py"
    script.write_text(STAND_IN_SERVER)
    return shlex.join([sys.executable, str(script)])


class Running:
    """One entrypoint process and its /readyz, on its own port."""

    def __init__(self, tmp: Path, bundle: Path, engines: Path, name: str = "ep", **env: str) -> None:
        self.port = free_port()
        self.log_path = tmp / f"{name}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SAM3_")}
        full_env.update(
            SAM3_BUNDLE=str(bundle),
            SAM3_ENGINES_DIR=str(engines),
            SAM3_HOST="127.0.0.1",
            SAM3_PORT=str(self.port),
            PYTHONPATH=str(REPO),
            **env,
        )
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.entrypoint"],
            cwd=REPO,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def readyz(self) -> tuple[int, dict] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
        except (OSError, ValueError):
            return None  # not bound yet, or between the status server and the real server

    def wait_for(self, predicate, what: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            answer = self.readyz()
            if answer is not None:
                if not seen or seen[-1] != answer[1].get("state"):
                    seen.append(answer[1].get("state"))
                if predicate(*answer):
                    return answer
            if self.proc.poll() is not None and answer is None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"never saw {what}; states seen {seen}; exit {self.proc.poll()}; log:\n{self.log()}"
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def running(tmp_path):
    started: list[Running] = []

    def start(*args, **kwargs) -> Running:
        proc = Running(tmp_path, *args, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def is_state(state: str):
    return lambda code, body: body.get("state") == state


def is_ready(code: int, body: dict) -> bool:
    return code == 200 and body.get("state") == "ready"


# --------------------------------------------------------------------------- tests


def test_empty_engines_dir_goes_building_then_ready(tmp_path, running):
    bundle = make_bundle(tmp_path / "bundle")
    engines = tmp_path / "volume" / "engines"  # does not exist yet: the entrypoint creates it
    gate = tmp_path / "gate"
    ep = running(
        bundle, engines,
        SAM3_BACKEND="auto",
        SAM3_ENGINE_BUILD_CMD=builder_cmd(tmp_path, gate, "ep"),
        SAM3_SERVE_CMD=stand_in_cmd(tmp_path),
    )  # fmt: skip
    code, body = ep.wait_for(is_state("building_engines"), "building_engines")
    assert code == 503
    # Liveness holds during the build: Docker must not kill a container that is busy building.
    with urllib.request.urlopen(f"http://127.0.0.1:{ep.port}/healthz", timeout=2) as resp:
        assert resp.status == 200
    assert not (engines / PLAN).exists()

    gate.touch()
    _, body = ep.wait_for(is_ready, "ready")
    # The entrypoint exec'd the server (same pid: SIGTERM reaches it) and handed it the engines dir.
    assert body["pid"] == ep.proc.pid
    assert body["engines_dir"] == str(engines)
    assert body["backend"] == "auto"
    assert (engines / PLAN).read_text() == "built by ep"
    assert (engines / "build.log").read_text().split() == ["build"]


def test_onnxruntime_backend_builds_nothing(tmp_path, running):
    bundle = make_bundle(tmp_path / "bundle")
    engines = tmp_path / "engines"
    gate = tmp_path / "gate"
    ep = running(
        bundle, engines,
        SAM3_BACKEND="onnxruntime",
        SAM3_ENGINE_BUILD_CMD=builder_cmd(tmp_path, gate, "ep"),
        SAM3_SERVE_CMD=stand_in_cmd(tmp_path),
    )  # fmt: skip
    _, body = ep.wait_for(is_ready, "ready")  # the gate is never opened: a build would hang
    assert body["backend"] == "onnxruntime"
    assert not (engines / "build.log").exists()


@pytest.mark.parametrize("damage", ["corrupt", "missing_manifest", "missing_file"])
def test_bad_bundle_exits_with_a_clear_message(tmp_path, damage):
    bundle = make_bundle(tmp_path / "bundle")
    if damage == "corrupt":
        (bundle / "decoder.onnx").write_bytes(b"flipped bits")
        expected = "decoder.onnx is corrupt"
    elif damage == "missing_manifest":
        (bundle / "manifest.json").unlink()
        expected = "manifest.json is missing"
    else:
        (bundle / "tokenizer.json").unlink()
        expected = "tokenizer.json is missing"
    marker = tmp_path / "built"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAM3_")}
    env.update(
        SAM3_BUNDLE=str(bundle),
        SAM3_ENGINES_DIR=str(tmp_path / "engines"),
        SAM3_PORT=str(free_port()),
        SAM3_ENGINE_BUILD_CMD=shlex.join(["touch", str(marker)]),
        SAM3_SERVE_CMD=shlex.join(["touch", str(marker)]),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.entrypoint"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == entrypoint.EXIT_BUNDLE, proc.stderr
    assert f"invalid bundle at {bundle}" in proc.stderr
    assert expected in proc.stderr
    assert not marker.exists(), "neither a build nor the server may start on a bad bundle"


def test_lock_held_by_another_process_waits_then_uses_its_engine(tmp_path, running):
    bundle = make_bundle(tmp_path / "bundle")
    engines = tmp_path / "engines"
    engines.mkdir()
    holder_gate = tmp_path / "holder-gate"
    # Another container, mid-build: holds the lock until the gate opens, then writes the plan.
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, time
            from pathlib import Path
            fd = os.open({str(engines / entrypoint.LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, b"pid %d (the other container)" % os.getpid())
            Path({str(tmp_path / "holding")!r}).touch()
            while not Path({str(holder_gate)!r}).exists():
                time.sleep(0.05)
            Path({str(engines / PLAN)!r}).write_text("built by the other container")
        """)]
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "holding").exists():
            assert time.monotonic() < deadline and holder.poll() is None, "lock holder did not start"
            time.sleep(0.05)

        ep = running(
            bundle, engines,
            SAM3_BACKEND="tensorrt",
            # The entrypoint's own builder is never gated: it may only wait on the lock.
            SAM3_ENGINE_BUILD_CMD=builder_cmd(tmp_path, tmp_path, "the entrypoint"),
            SAM3_SERVE_CMD=stand_in_cmd(tmp_path),
        )  # fmt: skip
        _, body = ep.wait_for(
            lambda code, body: (
                body.get("state") == "building_engines" and "waiting" in body.get("detail", "")
            ),
            "building_engines while waiting for the lock",
        )
        assert "the other container" in body["detail"]
        time.sleep(0.5)  # a broken lock would have let the builder run by now
        assert not (engines / "build.log").exists(), "the builder ran while another process held the lock"
        assert ep.readyz()[1]["state"] == "building_engines"

        holder_gate.touch()
        assert holder.wait(20) == 0
        ep.wait_for(is_ready, "ready after the lock was released")
        assert (engines / PLAN).read_text() == "built by the other container"
        assert (engines / "build.log").read_text().split() == ["skip"]
        assert "another process is building engines" in ep.log()
    finally:
        holder_gate.touch()
        holder.wait(20)


def test_two_entrypoints_starting_together_build_once(tmp_path, running):
    bundle = make_bundle(tmp_path / "bundle")
    engines = tmp_path / "engines"
    gate = tmp_path / "gate"
    cmd = builder_cmd(tmp_path, gate, "whichever got the lock")
    serve = stand_in_cmd(tmp_path)
    first = running(
        bundle, engines, name="a", SAM3_BACKEND="tensorrt", SAM3_ENGINE_BUILD_CMD=cmd, SAM3_SERVE_CMD=serve
    )
    second = running(
        bundle, engines, name="b", SAM3_BACKEND="tensorrt", SAM3_ENGINE_BUILD_CMD=cmd, SAM3_SERVE_CMD=serve
    )
    first.wait_for(is_state("building_engines"), "a building")
    second.wait_for(is_state("building_engines"), "b building")
    gate.touch()
    first.wait_for(is_ready, "a ready")
    second.wait_for(is_ready, "b ready")
    assert sorted((engines / "build.log").read_text().split()) == ["build", "skip"]


def test_failed_build_exits_unless_ort_fallback_allowed(tmp_path, running):
    bundle = make_bundle(tmp_path / "bundle")
    gate = tmp_path / "gate"
    gate.touch()
    failing = builder_cmd(tmp_path, gate, "x", exit_code=1)

    env = {k: v for k, v in os.environ.items() if not k.startswith("SAM3_")}
    env.update(
        SAM3_BUNDLE=str(bundle),
        SAM3_ENGINES_DIR=str(tmp_path / "e1"),
        SAM3_PORT=str(free_port()),
        SAM3_BACKEND="tensorrt",
        SAM3_ENGINE_BUILD_CMD=failing,
        SAM3_SERVE_CMD=stand_in_cmd(tmp_path),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.entrypoint"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == entrypoint.EXIT_BUILD, proc.stderr
    assert "engine build failed with exit code 1" in proc.stderr
    assert "SAM3_ALLOW_ORT_FALLBACK=1" in proc.stderr

    ep = running(
        bundle, tmp_path / "e2",
        SAM3_BACKEND="tensorrt",
        SAM3_ALLOW_ORT_FALLBACK="1",
        SAM3_ENGINE_BUILD_CMD=failing,
        SAM3_SERVE_CMD=stand_in_cmd(tmp_path),
    )  # fmt: skip
    _, body = ep.wait_for(is_ready, "ready on the ONNX Runtime fallback")
    assert body["backend"] == "onnxruntime"
    assert "FALLING BACK TO ONNX RUNTIME" in ep.log()


def test_unwritable_engines_dir_exits_with_a_hint(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # a file where the engines dir's parent should be: mkdir fails, even as root
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAM3_")}
    env.update(
        SAM3_BUNDLE=str(bundle),
        SAM3_ENGINES_DIR=str(blocker / "engines"),
        SAM3_PORT=str(free_port()),
        SAM3_BACKEND="tensorrt",
        SAM3_ENGINE_BUILD_CMD="true",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.entrypoint"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == entrypoint.EXIT_ENGINES_DIR, proc.stderr
    assert "set SAM3_ENGINES_DIR to a writable volume" in proc.stderr


def test_lock_is_released_when_the_holder_dies(tmp_path):
    """flock, not a lock file: a container killed mid-build must not block the next one forever."""
    engines = tmp_path / "engines"
    engines.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            f"import fcntl,os,time; fd=os.open({str(engines / entrypoint.LOCK_FILE)!r}, os.O_RDWR|os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"
        )],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(entrypoint.LockTimeout):
            entrypoint.acquire_build_lock(engines, timeout_s=0.3)
        holder.kill()
        holder.wait()
        fd = entrypoint.acquire_build_lock(engines, timeout_s=5)
        try:
            with pytest.raises(BlockingIOError):  # really held now, by us
                other = os.open(engines / entrypoint.LOCK_FILE, os.O_RDWR)
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                finally:
                    os.close(other)
        finally:
            os.close(fd)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_healthcheck_follows_readyz(tmp_path, running):
    bundle = make_bundle(tmp_path / "bundle")
    gate = tmp_path / "gate"
    ep = running(
        bundle, tmp_path / "engines",
        SAM3_BACKEND="tensorrt",
        SAM3_ENGINE_BUILD_CMD=builder_cmd(tmp_path, gate, "ep"),
        SAM3_SERVE_CMD=stand_in_cmd(tmp_path),
    )  # fmt: skip
    ep.wait_for(is_state("building_engines"), "building_engines")
    assert entrypoint.healthcheck("0.0.0.0", ep.port) == 1
    gate.touch()
    ep.wait_for(is_ready, "ready")
    assert entrypoint.healthcheck("0.0.0.0", ep.port) == 0
    assert entrypoint.healthcheck("127.0.0.1", free_port()) == 1  # nothing listening


# --------------------------------------------------------------------------- with the real server


def test_real_server_goes_building_then_ready(tmp_path, running, request):
    """The whole path with `python -m server` on the lead's tiny bundle and ONNX Runtime."""
    if not (REPO / "server" / "__main__.py").exists():
        pytest.skip("server/__main__.py does not exist yet: the stand-in server tests cover the entrypoint")
    try:
        tiny_bundle = Path(request.getfixturevalue("tiny_bundle"))
    except pytest.FixtureLookupError:
        pytest.skip("no tiny_bundle fixture in tests/conftest.py yet")
    # The bundle stays read-only in spirit: engines go to their own directory, as in the container.
    gate = tmp_path / "gate"
    ep = running(
        tiny_bundle, tmp_path / "engines",
        SAM3_BACKEND="auto",
        SAM3_ENGINE_BUILD_CMD=builder_cmd(tmp_path, gate, "ep"),
    )  # fmt: skip
    ep.wait_for(is_state("building_engines"), "building_engines", timeout=60)
    gate.touch()
    ep.wait_for(is_ready, "the real server ready", timeout=180)


def test_sigterm_during_build_stops_builder_and_exits(tmp_path, running):
    """`docker stop` mid-build: the builder is terminated, the lock released, exit 143 at once."""
    bundle = make_bundle(tmp_path / "bundle")
    engines = tmp_path / "engines"
    ep = running(
        bundle, engines,
        SAM3_BACKEND="tensorrt",
        SAM3_ENGINE_BUILD_CMD=builder_cmd(tmp_path, tmp_path / "never-opened", "ep"),
        SAM3_SERVE_CMD=stand_in_cmd(tmp_path),
    )  # fmt: skip
    ep.wait_for(is_state("building_engines"), "building_engines")
    deadline = time.monotonic() + 20
    while not (engines / "builder.pid").exists():  # the builder itself is running, gated
        assert time.monotonic() < deadline, ep.log()
        time.sleep(0.05)
    ep.proc.terminate()
    assert ep.proc.wait(10) == entrypoint.EXIT_SIGNAL, ep.log()
    assert not (engines / PLAN).exists()
    builder_pid = int((engines / "builder.pid").read_text())
    with pytest.raises(ProcessLookupError):  # terminated and reaped, not orphaned
        os.kill(builder_pid, 0)
    fd = entrypoint.acquire_build_lock(engines, timeout_s=2)  # released with the process
    os.close(fd)


def test_default_builder_command_is_accepted_by_the_real_builder(tmp_path):
    """No injected command: `python -m engines build ...` as the container runs it. Off-device
    it must fail for the documented reason (no GPU, exit 2), not on its arguments."""
    if entrypoint.tensorrt_importable():
        pytest.skip("TensorRT is installed here: this checks the off-device path")
    bundle = make_bundle(tmp_path / "bundle")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAM3_")}
    env.update(
        SAM3_BUNDLE=str(bundle),
        SAM3_ENGINES_DIR=str(tmp_path / "engines"),
        SAM3_PORT=str(free_port()),
        SAM3_BACKEND="tensorrt",
        SAM3_BUILD_WORKSPACE_MB="512",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.entrypoint"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == entrypoint.EXIT_BUILD, proc.stderr
    assert "--engines-dir" in proc.stderr and "--workspace-mb 512" in proc.stderr  # the logged command
    assert "unrecognized arguments" not in proc.stderr and "usage:" not in proc.stderr, proc.stderr
    assert "engine build failed with exit code 2: the builder saw no GPU" in proc.stderr
