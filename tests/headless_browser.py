"""Headless Chromium for the tests of self-contained pages (report/report.html, filter/report.html): the DOM the
browser built after the page's load check ran, and a screenshot."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest


def chromium() -> str:
    """The browser's path; skips the test without one (fails it where the full suite must run)."""
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    message = "Chromium is not installed (make test installs Debian's `chromium`: make browser)"
    if os.environ.get("KOLORA_REQUIRE_SLURM") == "1":
        pytest.fail(message)
    pytest.skip(message)


def _common(browser: str, profile: Path) -> list[str]:
    return [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={profile}", "--virtual-time-budget=5000"]


def body_attributes(browser: str, page: Path, profile: Path) -> dict[str, str]:
    """The attributes of <body> in the DOM the browser built (the pages' load check sets data-images and
    data-tables there)."""
    dom = subprocess.run([*_common(browser, profile), "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, dom.stdout[:500]
    return dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))


def screenshot(browser: str, page: Path, profile: Path, shot: Path, size: tuple[int, int]) -> Path:
    proc = subprocess.run([*_common(browser, profile), f"--screenshot={shot}", f"--window-size={size[0]},{size[1]}",
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    return shot


def dom(browser: str, url: str, profile: Path, size: tuple[int, int] | None = None) -> str:
    """The DOM the browser built for `url` (a page's file URI, with a #fragment its script reads); laid out in a
    window of `size` (as a screenshot of that width is) when given."""
    window = [f"--window-size={size[0]},{size[1]}"] if size else []
    proc = subprocess.run([*_common(browser, profile), *window, "--dump-dom", url], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout
