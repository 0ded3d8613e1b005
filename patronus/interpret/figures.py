"""Matplotlib figures rendered to uint8 tensors: the same picture goes to a PNG file and to wandb."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers/CI; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.io import decode_png  # noqa: E402


def render(fig: "plt.Figure", path: Optional[Path] = None) -> torch.Tensor:
    """Close `fig` and return it as a uint8 (3, H, W) tensor, saved to `path` as PNG if given."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))[:3]


def heatmap(
    values: torch.Tensor,
    *,
    xlabels: Sequence[str],
    ylabels: Sequence[str],
    title: str,
    xlabel: str = "",
    ylabel: str = "",
    diverging: bool = False,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    colorbar_label: str = "",
    path: Optional[Path] = None,
    annotate: bool = False,
) -> torch.Tensor:
    """A labelled heatmap of `values` (rows, cols); diverging maps are centred at 0."""
    v = values.detach().float().cpu()
    rows, cols = v.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.32 * cols, 16), min(1.5 + 0.28 * rows, 14)))
    if diverging:
        bound = float(v.nan_to_num().abs().max()) or 1.0
        im = ax.imshow(v, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    else:
        im = ax.imshow(v, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    step_x, step_y = max(1, cols // 24), max(1, rows // 40)
    ax.set_xticks(range(0, cols, step_x), [xlabels[i] for i in range(0, cols, step_x)], rotation=90, fontsize=7)
    ax.set_yticks(range(0, rows, step_y), [ylabels[i] for i in range(0, rows, step_y)], fontsize=7)
    if annotate and rows * cols <= 400:
        for (r, c), x in zip(torch.cartesian_prod(torch.arange(rows), torch.arange(cols)).tolist(), v.flatten().tolist()):
            ax.text(c, r, f"{x:.2f}", ha="center", va="center", fontsize=6, color="w")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.colorbar(im, ax=ax, label=colorbar_label, shrink=0.8)
    return render(fig, path)
