"""A real ``python -m server`` process for client tests, started with the server tests' own
helpers (tests/server/conftest.py) so both suites run the server the same way."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import SERVER_ENV, ServerProcess


@pytest.fixture(scope="session")
def live_server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tiny_bundle, SERVER_ENV, tmp_path_factory.mktemp("client-server-logs"))
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()
