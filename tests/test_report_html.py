"""report.html opens offline in a real headless browser: the verdict comes first and every image decodes."""

import shutil

import torch

from patronus import plots
from patronus.cli.report_html import write_html
from tests.browser import dump_dom

VERDICT = "Shortcut found: class=7 is predicted through marker, carried by p3, p5 (p = 0.0099; false-alarm rate of this report ≤ 5%)."


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
    dom = dump_dom(moved, tmp_path / "profile")
    assert 'id="verdict"' in dom and "Shortcut found: class=7 is predicted through marker" in dom
    assert 'data-images="2"' in dom and 'data-images-loaded="2"' in dom  # both images decoded in the browser
    assert "<table>" in dom
