"""Figures: matplotlib's object API (a Figure on its own Agg canvas), so no backend is selected and
pyplot holds none of them."""

import ast
import subprocess
import sys

from tests.conftest import REPO


def test_the_plots_package_neither_selects_a_backend_nor_imports_pyplot():
    for path in (REPO / "patronus" / "plots").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert not any("pyplot" in a.name for a in node.names), path.name
            elif isinstance(node, ast.ImportFrom):
                assert "pyplot" not in (node.module or "") and not any(a.name == "pyplot" for a in node.names), path.name
            elif isinstance(node, ast.Attribute):
                assert node.attr != "use" or not isinstance(node.value, ast.Name) or node.value.id != "matplotlib", path.name


def test_figures_render_to_uint8_and_png_without_pyplot(tmp_path):
    code = (
        "import sys, torch\n"
        "from patronus import plots\n"
        f"img = plots.heatmap(torch.rand(3, 4), xlabels=list('abcd'), ylabels=list('xyz'), title='t', path={str(tmp_path / 'h.png')!r})\n"
        "fig, ax = plots.subplots(figsize=(2, 2))\n"
        "ax.plot([0, 1], [1, 0])\n"
        "line = plots.render(fig)\n"
        "pyplot = sys.modules.get('matplotlib.pyplot')\n"
        "print(img.dtype, img.shape[0], line.shape[0], pyplot is None or not pyplot.get_fignums())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["torch.uint8", "3", "3", "True"], proc.stdout
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
