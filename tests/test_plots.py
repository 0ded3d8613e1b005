"""Figures: drawn on their own canvas, so no backend is selected and pyplot is never imported."""

import subprocess
import sys

from tests.conftest import REPO


def test_figures_render_without_pyplot_or_a_backend_switch(tmp_path):
    code = ("import sys, torch\n"
            "from patronus import plots\n"
            f"img = plots.heatmap(torch.rand(3, 4), xlabels=list('abcd'), ylabels=list('xyz'), title='t', path={str(tmp_path / 'h.png')!r})\n"
            "fig, ax = plots.subplots(figsize=(2, 2))\n"
            "ax.plot([0, 1], [1, 0])\n"
            "line = plots.render(fig)\n"
            "print(img.dtype, img.shape[0], line.shape[0], 'matplotlib.pyplot' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["torch.uint8", "3", "3", "False"], proc.stdout
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
