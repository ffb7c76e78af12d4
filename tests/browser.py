"""The machine's Chromium (Debian's package) driven by Playwright, and the GitOps page inside the Airflow
UI's plugin frame: shared by the browser test and the README screenshot. No browser download."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def chromium() -> Iterator:
    """A headless Chromium (``apt-get install chromium``; ``.ci/run`` installs it)."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is not installed (apt-get install chromium; .ci/run does it)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def gitops_frame(page, attempts: int = 120):
    """The GitOps page inside the Airflow UI's plugin frame, once it has rendered its data.

    Found through the ``iframe`` element (Playwright may report a sandboxed frame's URL as empty)."""
    page.wait_for_selector("iframe", timeout=60_000)
    for _ in range(attempts):
        for element in page.query_selector_all("iframe"):
            frame = element.content_frame()
            if frame is None:
                continue
            try:
                frame.wait_for_selector("body[data-loaded='true']", timeout=500)
                return frame
            except Exception:  # noqa: BLE001 - not rendered yet (or another frame)
                pass
        time.sleep(0.5)
    raise AssertionError(f"no rendered GitOps frame; frames: {[f.url for f in page.frames]}")
