"""report.html opens offline in a real headless browser: the verdict comes first and every image decodes."""

import os
import shutil
import subprocess

import pytest
import torch

from patronus import plots
from patronus.cli.report_html import write_html

VERDICT = "Shortcut found: class=7 is predicted through marker, carried by p3, p5 (p = 0.0099; false-alarm rate of this report ≤ 5%)."


def chromium() -> str:
    """The chromium binary; skip without it locally, fail under CI=true (.ci/run installs it)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("CI=true but no chromium on PATH; .ci/run installs Debian's chromium package")
    pytest.skip("no chromium on PATH (install Debian's `chromium` package) to render report.html in a real browser")


def test_report_html_is_self_contained_and_renders_in_a_headless_browser(tmp_path):
    plots.save_rows([torch.rand(4, 1, 16, 16) * 2 - 1, torch.rand(4, 1, 16, 16) * 2 - 1], tmp_path / "causal.png")
    plots.score_figure(torch.tensor([0.4, 0.1, 0.0]), [0], tmp_path / "ranking.png", threshold=0.08)
    md = f"**{VERDICT}**\n\n# Shortcut report\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![causal](causal.png)\n\n![ranking](ranking.png)\n"
    page = write_html(md, VERDICT, tmp_path, "Shortcut report")
    away = tmp_path / "elsewhere"
    away.mkdir()
    moved = away / "report.html"  # alone in a folder: nothing beside it to load
    shutil.move(page, moved)
    text = moved.read_text()
    assert text.count("data:image/png;base64,") == 2 and 'src="causal.png"' not in text
    assert text.index(VERDICT.split(":")[0]) < text.index("<h1>") and text.count(VERDICT.split(":")[0]) == 1  # leads, once
    profile = tmp_path / "profile"
    dom = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", moved.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'id="verdict"' in dom and "Shortcut found: class=7 is predicted through marker" in dom
    assert 'data-images="2"' in dom and 'data-images-loaded="2"' in dom  # both images decoded in the browser
    assert "<table>" in dom
