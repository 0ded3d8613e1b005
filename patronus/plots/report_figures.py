"""Figures of the shortcut report and the contamination sweep: rankings, maps, mitigation, sweeps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from patronus.plots.images import display_image
from patronus.plots.render import render, subplots


def score_figure(score: torch.Tensor, flagged: list[int], path: Path, threshold: Optional[float] = None) -> torch.Tensor:
    """Explained-away scores, best first; flagged in red; `threshold`: the score the calibrated test needed."""
    order = score.argsort(descending=True)[: min(15, len(score))]
    fig, ax = subplots(figsize=(6, 2.8))
    colours = ["tab:red" if int(j) in flagged else "tab:gray" for j in order]
    ax.bar(range(len(order)), score[order].tolist(), color=colours)
    if threshold is not None and threshold == threshold:
        ax.axhline(threshold, color="k", linestyle="--", linewidth=0.8, label="needed to be flagged (chance level)")
        ax.legend(fontsize=7)
    ax.set_xticks(range(len(order)), [f"p{int(j)}" for j in order], fontsize=7)
    ax.set(ylabel="AUROC explained by a confounder", title="shortcut ranking (red: flagged)")
    return render(fig, path)


def maps_figure(rows: list[tuple[int, torch.Tensor, torch.Tensor]], path: Path) -> torch.Tensor:
    """One row per prototype: images where it fires with its information map over them."""
    cols = max(len(imgs) for _, imgs, _ in rows)
    fig, axes = subplots(len(rows), cols, figsize=(1.2 * cols, 1.3 * len(rows)), squeeze=False)
    for r, (j, imgs, maps) in enumerate(rows):
        vmax = float(maps.max()) or 1.0
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(imgs):
                ax.set_axis_off()
                continue
            ax.imshow(display_image(imgs[c]), cmap="gray", vmin=0, vmax=1)
            ax.imshow(maps[c].float().cpu(), cmap="inferno", vmin=0, vmax=vmax, alpha=0.6, interpolation="nearest")
            if c == 0:
                ax.set_ylabel(f"p{j}", fontsize=8)
    fig.suptitle("where: information maps i(x; s_J | s_−J), median baseline", fontsize=8)
    return render(fig, path)


def unexplained_figure(
    image: torch.Tensor, effect: torch.Tensor, unexplained: torch.Tensor, peak: tuple[int, int], title: str, path: Optional[Path] = None
) -> torch.Tensor:
    """An example image, the pixel effect map and the part of it no prototype covers, peak marked."""
    fig, axes = subplots(1, 3, figsize=(6.6, 2.4))
    panels = [
        (display_image(image), "gray", "example image", None),
        (effect.float().cpu(), "coolwarm", "effect size (confounder − none)", float(effect.abs().max()) or 1.0),
        (unexplained.float().cpu(), "inferno", "no prototype looks here", None),
    ]
    for ax, (img, cmap, name, v) in zip(axes, panels):
        ax.imshow(img, cmap=cmap, vmin=-v if v else None, vmax=v, interpolation="nearest")
        ax.plot(peak[1], peak[0], marker="o", markerfacecolor="none", markeredgecolor="lime", markersize=12)
        ax.set_title(name, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=8)
    return render(fig, path)


def worst_group_figure(
    labels: Sequence[str], before: Sequence[float], after: Sequence[float], balanced: Sequence[float], path: Optional[Path] = None
) -> torch.Tensor:
    """Worst-group accuracy per finding: the classifier as trained, with the finding neutralised, and the
    group-balanced-training baseline."""
    fig, ax = subplots(figsize=(1.8 + 1.4 * len(labels), 2.8))
    x = torch.arange(len(labels)).float()
    for k, (vals, name, colour) in enumerate(
        ((before, "as trained", "tab:gray"), (after, "finding neutralised", "tab:green"), (balanced, "group-balanced training", "tab:blue"))
    ):
        ax.bar((x + (k - 1) * 0.27).tolist(), list(vals), width=0.27, label=name, color=colour)
    ax.set_xticks(x.tolist(), list(labels), fontsize=7)
    ax.set(ylim=(0, 1), ylabel="worst-group accuracy", title="mitigation: worst group of target × confounder (held-out)")
    ax.legend(fontsize=6)
    return render(fig, path)


def sweep_figure(
    levels: Sequence[float],
    series: dict[str, Sequence[float]],
    path: Optional[Path] = None,
    limits: Optional[dict[str, tuple[float, float]]] = None,
) -> torch.Tensor:
    """One panel per metric of the contamination sweep, against the share of the target carrying the marker.
    `limits` fixes a panel's y range (e.g. AUROC 0.5–1), so 0.9995 against 1.0 does not fill the panel."""
    fig, axes = subplots(1, len(series), figsize=(2.4 * len(series), 2.4), squeeze=False)
    for ax, (name, vals) in zip(axes[0], series.items()):
        ax.plot([100 * v for v in levels], [float("nan") if v is None else v for v in vals], marker="o")
        if limits and name in limits:
            lo, hi = limits[name]
            ax.set_ylim(lo - 0.04 * (hi - lo), hi + 0.04 * (hi - lo))
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("% of target with marker", fontsize=7)
        ax.tick_params(labelsize=7)
    return render(fig, path)
