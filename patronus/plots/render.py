"""Matplotlib figures without pyplot: a `Figure` on its own Agg canvas, rendered to a uint8 tensor.

Nothing here selects a backend or keeps global state: `subplots` builds a `matplotlib.figure.Figure`
with a `FigureCanvasAgg` attached (matplotlib's object API), so figures draw the same on a server,
in CI and beside an interactive session, and are freed like any other object once rendered.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchvision.io import decode_png


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kwargs: Any) -> tuple[Figure, Any]:
    """(figure, axes) like `pyplot.subplots`, on a canvas of its own instead of pyplot's figure manager."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def render(fig: Figure, path: Optional[Path] = None) -> torch.Tensor:
    """`fig` as a uint8 (3, H, W) tensor, saved to `path` as PNG if given."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))[:3]
