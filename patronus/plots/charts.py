"""Charts of numbers: heatmaps, histograms and curves over prototypes, timesteps and pixel fractions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from matplotlib import colormaps

from patronus.interpret.emergence import emergence_times
from patronus.interpret.information import InformationResult, log_snr
from patronus.plots.render import render, subplots

if TYPE_CHECKING:
    from patronus.models.patronus import PatronusModel


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
    fig, ax = subplots(figsize=(min(2 + 0.32 * cols, 16), min(1.5 + 0.28 * rows, 14)))
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


def histogram_figure(hists: list[tuple[torch.Tensor, torch.Tensor]], title: str, path: Optional[Path] = None) -> torch.Tensor:
    """Small multiples, one panel per prototype, its range in the title (tick labels cost most of
    the drawing time); uint8 (3, H, W), saved as PNG if `path` is given."""
    k = len(hists)
    cols = min(k, 6)
    rows = math.ceil(k / cols)
    height = 1.0 * rows + 0.4  # inches: 0.4 on top for the title
    fig, axes = subplots(
        rows,
        cols,
        figsize=(1.6 * cols, height),
        squeeze=False,
        gridspec_kw={"hspace": 0.6, "wspace": 0.15, "top": 1 - 0.45 / height, "bottom": 0.1 / height},
    )
    for j, ax in enumerate(axes.flat):
        if j >= k:
            ax.set_visible(False)
            continue
        counts, edges = hists[j]
        ax.stairs(counts.numpy(), edges.numpy(), fill=True, color="tab:blue")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"p{j}: {float(edges[0]):.3g} – {float(edges[-1]):.3g}", fontsize=6, pad=2)
    fig.suptitle(title, fontsize=8, y=1 - 0.05 / height, va="top")
    return render(fig, path)


def emergence_heatmap(
    values: torch.Tensor,
    timesteps: torch.Tensor,
    title: str,
    path: Optional[Path] = None,
    ylabels: Optional[Sequence[str]] = None,
    colorbar_label: str = "Δ activation",
) -> torch.Tensor:
    """Prototype × timestep heatmap of `values` (K, S), t decreasing left→right as in decoding,
    diverging colours centred at 0; uint8 (3, H, W), saved as PNG if `path` is given."""
    ylabels = list(ylabels) if ylabels is not None else [str(j) for j in range(len(values))]
    return heatmap(
        values,
        xlabels=[str(int(t)) for t in timesteps],
        ylabels=ylabels,
        title=title,
        xlabel="timestep t (decoding →)",
        ylabel="prototype",
        diverging=True,
        colorbar_label=colorbar_label,
        path=path,
    )


def emergence_curve_plot(
    mean: torch.Tensor,
    std: torch.Tensor,
    timesteps: torch.Tensor,
    labels: Sequence[str],
    path: Optional[Path] = None,
    title: str = "emergence: s_J(x̂0(t)) − s_J(x0)",
    fraction: float = 0.5,
) -> torch.Tensor:
    """Mean ± std curves (S, P) against t (decreasing left→right), each with its emergence time
    marked; uint8 (3, H, W), saved as PNG if `path` is given."""
    m, sd, t = mean.float().cpu(), std.float().cpu(), timesteps.float().cpu()
    times = emergence_times(t, m, fraction)
    fig, ax = subplots(figsize=(7, 4))
    for j, label in enumerate(labels):
        (line,) = ax.plot(t, m[:, j], label=label, lw=1.5)
        ax.fill_between(t, m[:, j] - sd[:, j], m[:, j] + sd[:, j], color=line.get_color(), alpha=0.15, lw=0)
        if not math.isnan(float(times[j])):
            low = float(m[:, j].min())
            level = low + fraction * (float(m[-1, j]) - low)
            ax.axvline(float(times[j]), color=line.get_color(), ls=":", lw=1)
            ax.plot([float(times[j])], [level], "o", color=line.get_color(), ms=5)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.invert_xaxis()  # decoding runs from t = T to 0
    ax.set(title=title, xlabel="timestep t (decoding →); dots: emergence time", ylabel="Δ activation")
    ax.legend(fontsize=7, ncol=2)
    return render(fig, path)


def when_figure(result: InformationResult, path: Optional[Path] = None, model: Optional[PatronusModel] = None) -> torch.Tensor:
    """The α-density ½E‖Δε̂‖² per node, mean over images, one line per prototype.

    With `model`, the x axis is log-SNR (the integration variable: a line's integral over it
    is the prototype's information; noisier to the right), the nodes' timesteps on top; else t.
    """
    fig, ax = subplots(figsize=(6.5, 3.6))
    mean = result.curve.mean(0).cpu()  # (P, S)
    x = log_snr(model, result.timesteps).tolist() if model is not None else result.timesteps.tolist()
    colours = colormaps["turbo"](torch.linspace(0.05, 0.95, len(result.labels)).tolist())
    for p, label in enumerate(result.labels):  # distinct colours, and a line style per ten for K > 10
        ax.plot(x, mean[p].tolist(), marker=".", color=colours[p], linestyle=("-", "--", ":")[(p // 10) % 3], label=f"p{label}")
    ax.set(ylabel="½ E‖Δε̂‖²  (nats per unit log-SNR)", yscale="log")
    if model is not None:
        ax.invert_xaxis()
        ax.set_xlabel("log-SNR α (noisier →)")
        top = ax.secondary_xaxis("top")
        every = max(1, len(x) // 8)
        top.set_xticks(x[::every], [str(t) for t in result.timesteps.tolist()[::every]], fontsize=7)
        top.set_xlabel("timestep t", fontsize=8)
    else:
        ax.set_xlabel("timestep t (noisier →)")
    ax.set_title("when: information density per unit log-SNR (its integral over α = the nats)", fontsize=9)
    ax.legend(fontsize=6, ncol=max(1, len(result.labels) // 10), loc="best")
    return render(fig, path)


def faithfulness_figure(scores: dict[str, dict[str, torch.Tensor]], title: str = "", path: Optional[Path] = None) -> torch.Tensor:
    """Deletion and insertion curves, mean over images, one line per map (AUC in the legend)."""
    fig, axes = subplots(1, 2, figsize=(9, 3.4))
    for name, res in scores.items():
        x = res["fractions"].tolist()
        style = dict(color="grey", linestyle="--") if name == "random" else {}
        for ax, kind in zip(axes, ("deletion", "insertion")):
            ax.plot(
                x,
                res[f"{kind}_curve"].mean(0).cpu().tolist(),
                marker=".",
                **style,
                label=f"{name} (AUC {float(res[f'{kind}_auc'].mean()):.3f})",
            )
    for ax, kind, better in zip(axes, ("deletion", "insertion"), ("lower", "higher")):
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set(
            xlabel=f"fraction of pixels {'deleted' if kind == 'deletion' else 'inserted'} (most important first)",
            ylabel="f / f(x_t)",
            title=f"{kind} ({better} AUC = more faithful)",
        )
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    return render(fig, path)
