"""Image ids: a keyed hash of the image bytes, per namespace.

``image_id = HMAC-SHA256(secret, namespace || 0x00 || bytes)``. Without the secret an id tells
nothing about the bytes: holding a copy of a file no longer tells anyone whether (or by whom) it
was uploaded, and the same file gets a different id under each API key (server/auth.py), so one
key can neither compute nor use another key's ids. The embedding cache is keyed by namespace too.

The secret is ``SAM3_ID_SECRET`` when configured (replicas behind one load balancer share it),
else generated once and kept in ``SAM3_ID_SECRET_FILE`` (mode 0600, written atomically) so ids
stay stable across restarts; if that file cannot be written the secret lives for this process
only (a warning says so): ids are then new after a restart, which costs clients one re-upload.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import tempfile
from pathlib import Path

from server.settings import Settings

log = logging.getLogger("server")

SECRET_BYTES = 32
ID_PATTERN = r"^[0-9a-f]{64}$"


def default_secret_file() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "sam3-edge" / "id-secret"


def load_secret(settings: Settings) -> bytes:
    """The configured secret, else the persisted one (created on first use)."""
    if settings.id_secret is not None:
        return hashlib.sha256(settings.id_secret.get_secret_value().encode()).digest()
    path = settings.id_secret_file or default_secret_file()
    try:
        data = path.read_bytes()
        if len(data) >= SECRET_BYTES:
            return data[:SECRET_BYTES]
        log.warning("id secret %s is shorter than %d bytes; writing a new one", path, SECRET_BYTES)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot read id secret %s (%s); image ids will change on restart", path, exc.strerror or exc)
        return secrets.token_bytes(SECRET_BYTES)
    fresh = secrets.token_bytes(SECRET_BYTES)
    try:
        _write_private(path, fresh)
    except OSError as exc:
        log.warning("cannot write id secret %s (%s); image ids will change on restart", path, exc.strerror or exc)
    return fresh


def _write_private(path: Path, data: bytes) -> None:
    """Atomic create: a temporary file (0600) renamed into place; never a half-written secret."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".id-secret-")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    finally:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)


class ImageIds:
    """``of(namespace, data)``: the id a client in ``namespace`` gets for ``data``."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def of(self, namespace: str, data: bytes) -> str:
        digest = hmac.new(self._secret, namespace.encode("utf-8") + b"\x00", hashlib.sha256)
        digest.update(data)
        return digest.hexdigest()
