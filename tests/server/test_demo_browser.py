"""The demo page in a real browser: upload an image, submit a prompt, see detections drawn.

Needs Debian's Chromium (``apt-get install -y chromium``) and ``pip install playwright==1.65.2``
(no browser download: Playwright drives /usr/bin/chromium). Skips with a message otherwise.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.server.conftest import image_bytes

CHROMIUM = os.environ.get("SAM3_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright==1.65.2 to run the browser test")
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set SAM3_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


def test_demo_page_draws_detections_and_reuses_image_id(browser, server, tmp_path) -> None:
    photo = tmp_path / "photo.png"
    photo.write_bytes(image_bytes(seed=77, width=320, height=240, fmt="PNG"))
    page = browser.new_page()
    requests: list[dict] = []
    page.on("request", lambda r: requests.append(r.post_data_json) if r.url.endswith("/segment") else None)
    page.goto(server.url + "/")
    page.set_input_files("#file", str(photo))
    page.wait_for_function("document.getElementById('status').textContent.includes('320x240')", timeout=10_000)
    before = page.evaluate("Array.from(document.getElementById('canvas').getContext('2d')"
                           ".getImageData(0, 0, 320, 240).data)")
    page.fill("#prompts", "cat")
    page.fill("#score", "0")
    page.click("#submit")
    page.wait_for_function("document.getElementById('canvas').dataset.detections !== undefined", timeout=20_000)
    drawn = int(page.eval_on_selector("#canvas", "c => c.dataset.detections"))
    assert drawn > 0, page.inner_text("#status")
    after = page.evaluate("Array.from(document.getElementById('canvas').getContext('2d')"
                          ".getImageData(0, 0, 320, 240).data)")
    changed = sum(1 for a, b in zip(before, after) if a != b)
    assert changed > 1000, "masks/boxes should change the canvas pixels"
    assert "cat" in page.inner_text("#results")

    # Follow-up prompt: the page sends the image_id, not the image, and the server hits its cache.
    page.fill("#prompts", "dog")
    page.click("#submit")
    page.wait_for_function("document.getElementById('timings').textContent.includes('cache_hit: true')", timeout=20_000)
    assert "image" in requests[0] and "image_id" not in requests[0]
    assert requests[-1].get("image_id") and "image" not in requests[-1]
    page.close()
