"""Maps over images: per-pixel information, its decomposition and attributions, drawn as one mosaic each."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
from matplotlib import colormaps

from patronus.interpret.information import PID_TERMS, InformationResult
from patronus.plots.images import display_image
from patronus.plots.render import render, subplots


def overlay_rgb(
    image: torch.Tensor, heat: torch.Tensor, vmin: float, vmax: float, cmap: str = "inferno", alpha: float = 0.65
) -> torch.Tensor:
    """(H, W, 3) in [0, 1]: the image in grey (or colour) under `heat` coloured by `cmap` at `alpha`."""
    base = display_image(image)
    base = base[..., None].expand(*base.shape, 3) if base.ndim == 2 else base
    norm = ((heat.detach().float().cpu() - vmin) / ((vmax - vmin) or 1.0)).clamp(0, 1)
    colour = torch.from_numpy(colormaps[cmap](norm.numpy())[..., :3]).float()
    return (1 - alpha) * base + alpha * colour


def mosaic_figure(
    cells: list[list[torch.Tensor]],
    cell_text: list[list[str]],
    col_labels: Sequence[str],
    row_labels: Sequence[str],
    title: str,
    path: Optional[Path] = None,
    inches: float = 0.9,
) -> torch.Tensor:
    """A grid of (H, W, 3) cells drawn as ONE image with a text band above each cell.

    One imshow of the tiled mosaic and a text label per cell, not a subplot per map: hundreds of
    axes (images × prototypes) render many times slower than one.
    """
    R, C = len(cells), len(cells[0])
    H, W = cells[0][0].shape[:2]
    band, pad = max(4, H // 3), max(1, H // 16)  # text band above each cell, gap between columns
    canvas = torch.ones(R * (band + H), C * (W + pad), 3)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            y, x = r * (band + H) + band, c * (W + pad)
            canvas[y : y + H, x : x + W] = cell
    fig, ax = subplots(figsize=(inches * C, inches * R * (band + H) / H))
    ax.imshow(canvas.numpy(), interpolation="nearest")
    for r in range(R):
        for c in range(C):
            if cell_text[r][c]:
                ax.text(c * (W + pad) + W / 2, r * (band + H) + band - 1, cell_text[r][c], ha="center", va="bottom", fontsize=6)
    ax.set_xticks([c * (W + pad) + W / 2 for c in range(C)], list(col_labels), fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks([r * (band + H) + band + H / 2 for r in range(R)], list(row_labels), fontsize=7)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=8, pad=14)
    return render(fig, path)


def information_figure(images: torch.Tensor, result: InformationResult, path: Optional[Path] = None, max_images: int = 8) -> torch.Tensor:
    """Per image a row: the image, then each prototype's "where" map over it (uint8 (3, H, W)).

    One colour scale per row, so within an image the prototypes are comparable; it saturates
    at the row's 99.5th percentile, since a few hot pixels would otherwise leave every other map
    black. The number above each map is its image-level information in nats.
    """
    B, P = min(len(images), max_images), result.pixel.shape[1]
    cells, text = [], []
    for b in range(B):
        vmax = float(torch.quantile(result.pixel[b].float().flatten().cpu(), 0.995)) or 1.0
        cells.append(
            [overlay_rgb(images[b], torch.zeros(images.shape[-2:]), 0, 1, alpha=0.0)]
            + [overlay_rgb(images[b], result.pixel[b, p], 0.0, vmax) for p in range(P)]
        )
        text.append([""] + [f"{float(result.total[b, p]):.2g}" for p in range(P)])
    return mosaic_figure(
        cells,
        text,
        ["image"] + [f"p{j}" for j in result.labels],
        [str(b) for b in range(B)],
        "where: ½∫E‖Δε̂‖² dα per pixel, one colour scale per row (nats per image above each map)",
        path,
    )


def pid_figure(
    images: torch.Tensor, pid: dict[str, torch.Tensor], pairs: Sequence[tuple[int, int]], path: Optional[Path] = None, max_images: int = 4
) -> torch.Tensor:
    """Rows (pair, image): the image then i_J, i_L, i_JL, redundancy, unique J, unique L, synergy.

    One colour scale per row (the 99.5th percentile of i_J, i_L, i_JL); synergy, which can be
    negative, on a diverging scale (red > 0, blue < 0).
    """
    B = min(len(images), max_images)
    cells, text, row_labels = [], [], []
    for k, (j, l) in enumerate(pairs):
        for b in range(B):
            pooled = torch.stack([pid[t][b, k] for t in ("first", "second", "joint")]).float().flatten().cpu()
            vmax = float(torch.quantile(pooled, 0.995)) or 1.0  # as information_figure: not set by a few hot pixels
            row = [overlay_rgb(images[b], torch.zeros(images.shape[-2:]), 0, 1, alpha=0.0)]
            for term in PID_TERMS:
                lo, cmap = (-vmax, "RdBu_r") if term == "synergy" else (0.0, "inferno")
                row.append(overlay_rgb(images[b], pid[term][b, k], lo, vmax, cmap))
            cells.append(row)
            text.append([""] + [f"{float(pid[t][b, k].sum()):.2g}" for t in PID_TERMS])
            row_labels.append(f"p{j}+p{l} #{b}")
    names = ["image", "i_J", "i_L", "i_JL", "redundancy", "unique J", "unique L", "synergy"]
    return mosaic_figure(cells, text, names, row_labels, "MMI decomposition per pixel (nats per image above each map)", path)


def attribution_figure(
    images: torch.Tensor,
    x_t: torch.Tensor,
    saliency: torch.Tensor,
    information: torch.Tensor,
    title: str = "",
    path: Optional[Path] = None,
    max_images: int = 8,
    signed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per image a row: the image, x_t, the saliency map, the information map at t and, if given,
    the signed gradient × input (red: deleting the pixel lowers f, blue: raises it) (uint8 (3, H, W)).
    Each map on its own scale (0 or −max to its max)."""
    B = min(len(images), max_images)
    names = ["image", "x_t", "|∂f/∂x_t|", "½‖Δε̂‖² at t"] + (["x_t·∂f/∂x_t"] if signed is not None else [])
    blank = torch.zeros(images.shape[-2:])
    cells = []
    for b in range(B):
        xt = x_t[b].detach().float().cpu()
        row = [overlay_rgb(images[b], blank, 0, 1, alpha=0.0), overlay_rgb(xt / xt.abs().max().clamp_min(1e-12), blank, 0, 1, alpha=0.0)]
        row += [overlay_rgb(images[b], m[b], 0.0, float(m[b].max()) or 1.0, alpha=1.0) for m in (saliency, information)]
        if signed is not None:
            bound = float(signed[b].abs().max()) or 1.0
            row.append(overlay_rgb(images[b], signed[b], -bound, bound, "RdBu_r", alpha=1.0))
        cells.append(row)
    return mosaic_figure(cells, [[""] * len(names) for _ in range(B)], names, [str(b) for b in range(B)], title, path, inches=1.2)
