"""The demo page against a server with API keys: every call it makes carries the key.

Needs Debian's Chromium and Playwright, as tests/server/test_demo_browser.py; skips otherwise.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.server.conftest import ServerProcess, image_bytes

CHROMIUM = os.environ.get("SAM3_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
KEY = "page-key-1"


def test_the_page_sends_the_key_on_every_call(server_bundle: Path, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright==1.65.2 to run the browser test")
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set SAM3_CHROMIUM)")
    proc = ServerProcess(server_bundle, {"SAM3_API_KEYS": f"page:{KEY}"}, tmp_path)
    photo = tmp_path / "photo.png"
    photo.write_bytes(image_bytes(seed=78, width=200, height=150, fmt="PNG"))
    try:
        proc.wait_ready()
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            try:
                page = browser.new_page()
                calls: list[tuple[str, str | None]] = []
                page.on("request", lambda r: calls.append((r.url, r.headers.get("x-api-key"))))
                page.goto(proc.url + "/")
                page.wait_for_load_state("networkidle")
                calls.clear()  # before a key is typed the page has none to send
                page.fill("#apikey", KEY)
                page.dispatch_event("#apikey", "change")  # the page reloads /info with the key
                page.set_input_files("#file", str(photo))
                page.wait_for_function("document.getElementById('status').textContent.includes('200x150')",
                                       timeout=10_000)
                page.fill("#prompts", "cat")
                page.fill("#score", "0")
                page.click("#submit")
                page.wait_for_function("document.getElementById('canvas').dataset.detections !== undefined",
                                       timeout=20_000)
                page.click("#submit")  # follow-up by image_id
                page.wait_for_function(
                    "document.getElementById('timings').textContent.includes('cache_hit: true')", timeout=20_000)
                status = page.inner_text("#status")
            finally:
                browser.close()
    finally:
        proc.stop()
    api = [(url, key) for url, key in calls if url.startswith(proc.url) and urlparse(url).path != "/"]
    assert any(url.endswith("/info") for url, _ in api) and sum(url.endswith("/segment") for url, _ in api) == 2, calls
    assert all(key == KEY for _, key in api), api
    assert "detection" in status
