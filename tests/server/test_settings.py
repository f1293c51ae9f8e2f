"""Settings are the public contract: env names, README and the CLI agree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from server.settings import ENV_VARS, Settings

REPO = Path(__file__).resolve().parents[2]


def test_readme_lists_exactly_the_settings() -> None:
    readme = (REPO / "server" / "README.md").read_text()
    documented = set(re.findall(r"`(SAM3_[A-Z0-9_]+)`", readme))
    assert documented == set(ENV_VARS)


def test_env_prefix_and_types(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAM3_CACHE_BYTES", "12345")
    monkeypatch.setenv("SAM3_ALLOWED_CONTENT_TYPES", "image/jpeg, IMAGE/PNG")
    monkeypatch.setenv("SAM3_API_KEY", "s3cret-value")
    settings = Settings()
    assert settings.cache_bytes == 12345
    assert settings.allowed_content_types == ("image/jpeg", "image/png")
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "s3cret-value"
    assert "s3cret-value" not in repr(settings)  # the key never lands in logs


def test_cli_rejects_missing_bundle(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server", "--bundle", str(tmp_path / "nope"), "--port", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_server_imports_no_torch_or_export() -> None:
    code = "import sys, server.app, server.__main__; bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'export'))]; print(bad); sys.exit(bool(bad))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_orin_nano_defaults_are_the_documented_ones() -> None:
    """docs/deploy-jetson.md's table of 8 GB Orin Nano values: its SAM3 column is the default."""
    doc = (REPO / "docs" / "deploy-jetson.md").read_text()
    table = doc[doc.index("| Setting | default = SAM3 on Orin Nano 8 GB |"):].split("\n\n", 1)[0]
    rows = dict(re.findall(r"^\| `(SAM3_[A-Z_]+)` \| ([0-9.]+)", table, re.M))
    assert set(rows) == {"SAM3_CACHE_BYTES", "SAM3_MAX_MEGAPIXELS", "SAM3_MAX_MASKS", "SAM3_DECODE_CONCURRENCY"}
    defaults = Settings()
    for name, value in rows.items():
        assert float(getattr(defaults, name[len("SAM3_"):].lower())) == float(value), name
