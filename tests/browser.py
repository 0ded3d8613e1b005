"""The headless browser the page-rendering tests use (Debian's chromium): skipped locally without it,
a failure under CI=true, where .ci/run installs it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def chromium() -> str:
    """The chromium binary; skip without it locally, fail under CI=true (.ci/run installs it)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("CI=true but no chromium on PATH; .ci/run installs Debian's chromium package")
    pytest.skip("no chromium on PATH (install Debian's `chromium` package) to render pages in a real browser")


def dump_dom(page: Path, profile: Path, budget_ms: int = 5000) -> str:
    """The DOM of a local page after its scripts ran, as headless chromium serialises it."""
    return subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            "--dump-dom",
            page.as_uri(),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
