"""Every figure and image grid of the package, in one place.

Matplotlib figures are rendered to uint8 (3, H, W) tensors, so the same picture goes to a PNG
file and to wandb/TensorBoard; image grids are torchvision grids. Analyses never draw: they
return tensors, and the command line and the training callbacks turn them into pictures here.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers/CI; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from einops import rearrange  # noqa: E402
from torchvision.io import decode_png, write_png  # noqa: E402
from torchvision.utils import draw_bounding_boxes, make_grid, save_image  # noqa: E402

from patronus.interpret.emergence import emergence_times  # noqa: E402
from patronus.interpret.information import PID_TERMS, InformationResult, log_snr  # noqa: E402

if TYPE_CHECKING:
    from patronus.interpret.localise import EditOutcome, Localisation
    from patronus.interpret.projection import PatchHit
    from patronus.models.patronus import PatronusModel
    from patronus.models.prototypes import ReceptiveField


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


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] for image files and loggers."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def reference_grid(refs: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """Row 1 the references, row 2 their samples; uint8 (3, H, W), like every figure here."""
    return unit_to_uint8(make_grid(to_unit(torch.cat([refs.cpu(), samples.cpu()])), nrow=len(refs), padding=1))


def unit_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] float -> uint8 exactly as torchvision's `save_image` rounds it, so a picture logged
    from the tensor and the PNG written from it hold the same pixels."""
    return x.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def save_rows(rows: Sequence[torch.Tensor], path: Path) -> Path:
    """Rows of equally many images -> one PNG grid."""
    batch = torch.cat([r.cpu() for r in rows])
    save_image(make_grid(to_unit(batch), nrow=len(rows[0]), padding=1, pad_value=1.0), path)
    return path


def to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (C, H, W) -> uint8 RGB, for drawing."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(3, -1, -1) if x.shape[0] == 1 else x


def patch_gallery(images: torch.Tensor, hits: list[list["PatchHit"]], scale: int = 2) -> torch.Tensor:
    """One row per prototype: each hit's full image with its receptive-field box drawn (uint8 grid)."""
    tiles = []
    for row in hits:
        for h in row:
            img = to_uint8_rgb(images[h.image_index])
            top, left, bottom, right = h.box
            boxed = draw_bounding_boxes(img, torch.tensor([[left, top, right - 1, bottom - 1]]), colors="red", width=1)
            tiles.append(torch.nn.functional.interpolate(boxed[None].float(), scale_factor=scale, mode="nearest")[0])
    return make_grid(torch.stack(tiles), nrow=len(hits[0]), padding=2, pad_value=255).to(torch.uint8)


def localisation_gallery(plain: torch.Tensor, edited: torch.Tensor, found: list["Localisation"], scale: int = 3) -> torch.Tensor:
    """Pairs per prototype: the plain decode and the edited one with J's receptive-field box (uint8 grid)."""
    tiles = []
    for loc, img in zip(found, edited):
        top, left, bottom, right = loc.box
        box = torch.tensor([[left, top, right - 1, bottom - 1]])
        tiles.append(to_uint8_rgb(plain[loc.image_index]))
        tiles.append(draw_bounding_boxes(to_uint8_rgb(img), box, colors="red", width=1))
    big = torch.nn.functional.interpolate(torch.stack(tiles).float(), scale_factor=scale, mode="nearest")
    return make_grid(big, nrow=8, padding=2, pad_value=255).to(torch.uint8)


def consistency_grid(outcome: "EditOutcome", rf: "ReceptiveField", scale: int = 2) -> torch.Tensor:
    """One row per prototype: J raised in each image, its receptive-field box drawn (red: s_J rose; grey: it did not)."""
    tiles = []
    for i in range(len(outcome.prototypes)):
        for b in range(outcome.edited.shape[1]):
            top, left, bottom, right = rf.box(*outcome.cells[i, b].tolist())
            colour = "red" if outcome.rise[i, b] > 0 else "gray"
            img = to_uint8_rgb(outcome.edited[i, b].cpu())
            tiles.append(draw_bounding_boxes(img, torch.tensor([[left, top, right - 1, bottom - 1]]), colors=colour, width=1))
    big = torch.nn.functional.interpolate(torch.stack(tiles).float(), scale_factor=scale, mode="nearest")
    return make_grid(big, nrow=outcome.edited.shape[1], padding=2, pad_value=255).to(torch.uint8)


def histogram_figure(hists: list[tuple[torch.Tensor, torch.Tensor]], title: str, path: Optional[Path] = None) -> torch.Tensor:
    """Small multiples, one panel per prototype, its range in the title (tick labels cost most of
    the drawing time); uint8 (3, H, W), saved as PNG if `path` is given."""
    k = len(hists)
    cols = min(k, 6)
    rows = math.ceil(k / cols)
    height = 1.0 * rows + 0.4  # inches: 0.4 on top for the title
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, height), squeeze=False,
                             gridspec_kw={"hspace": 0.6, "wspace": 0.15, "top": 1 - 0.45 / height, "bottom": 0.1 / height})
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
        values, xlabels=[str(int(t)) for t in timesteps], ylabels=ylabels, title=title, xlabel="timestep t (decoding →)",
        ylabel="prototype", diverging=True, colorbar_label=colorbar_label, path=path,
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
    fig, ax = plt.subplots(figsize=(7, 4))
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


def display_image(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) in [-1, 1] -> (H, W, 3) or (H, W) in [0, 1] for imshow."""
    x = ((image.detach().float().cpu() + 1) / 2).clamp(0, 1)
    return x[0] if x.shape[0] == 1 else rearrange(x, "c h w -> h w c")


def overlay_rgb(image: torch.Tensor, heat: torch.Tensor, vmin: float, vmax: float, cmap: str = "inferno",
                alpha: float = 0.65) -> torch.Tensor:
    """(H, W, 3) in [0, 1]: the image in grey (or colour) under `heat` coloured by `cmap` at `alpha`."""
    base = display_image(image)
    base = base[..., None].expand(*base.shape, 3) if base.ndim == 2 else base
    norm = ((heat.detach().float().cpu() - vmin) / ((vmax - vmin) or 1.0)).clamp(0, 1)
    colour = torch.from_numpy(matplotlib.colormaps[cmap](norm.numpy())[..., :3]).float()
    return (1 - alpha) * base + alpha * colour


def mosaic_figure(cells: list[list[torch.Tensor]], cell_text: list[list[str]], col_labels: Sequence[str],
                  row_labels: Sequence[str], title: str, path: Optional[Path] = None, inches: float = 0.9) -> torch.Tensor:
    """A grid of (H, W, 3) cells drawn as ONE image with a text band above each cell.

    A subplot per map (8 images × 31 prototypes = 248 axes) took ~15 s to render on 2 cores;
    one imshow of the tiled mosaic and a few hundred text labels take well under a second.
    """
    R, C = len(cells), len(cells[0])
    H, W = cells[0][0].shape[:2]
    band, pad = max(4, H // 3), max(1, H // 16)  # text band above each cell, gap between columns
    canvas = torch.ones(R * (band + H), C * (W + pad), 3)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            y, x = r * (band + H) + band, c * (W + pad)
            canvas[y : y + H, x : x + W] = cell
    fig, ax = plt.subplots(figsize=(inches * C, inches * R * (band + H) / H))
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
        cells.append([overlay_rgb(images[b], torch.zeros(images.shape[-2:]), 0, 1, alpha=0.0)]
                     + [overlay_rgb(images[b], result.pixel[b, p], 0.0, vmax) for p in range(P)])
        text.append([""] + [f"{float(result.total[b, p]):.2g}" for p in range(P)])
    return mosaic_figure(cells, text, ["image"] + [f"p{j}" for j in result.labels], [str(b) for b in range(B)],
                         "where: ½∫E‖Δε̂‖² dα per pixel, one colour scale per row (nats per image above each map)", path)


def when_figure(result: InformationResult, path: Optional[Path] = None, model: Optional["PatronusModel"] = None) -> torch.Tensor:
    """The α-density ½E‖Δε̂‖² per node, mean over images, one line per prototype.

    With `model`, the x axis is log-SNR (the integration variable: a line's integral over it
    is the prototype's information; noisier to the right), the nodes' timesteps on top; else t.
    """
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    mean = result.curve.mean(0).cpu()  # (P, S)
    x = log_snr(model, result.timesteps).tolist() if model is not None else result.timesteps.tolist()
    colours = matplotlib.colormaps["turbo"](torch.linspace(0.05, 0.95, len(result.labels)).tolist())
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


def pid_figure(images: torch.Tensor, pid: dict[str, torch.Tensor], pairs: Sequence[tuple[int, int]],
               path: Optional[Path] = None, max_images: int = 4) -> torch.Tensor:
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


def attribution_figure(images: torch.Tensor, x_t: torch.Tensor, saliency: torch.Tensor, information: torch.Tensor,
                       title: str = "", path: Optional[Path] = None, max_images: int = 8,
                       signed: Optional[torch.Tensor] = None) -> torch.Tensor:
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


def faithfulness_figure(scores: dict[str, dict[str, torch.Tensor]], title: str = "", path: Optional[Path] = None) -> torch.Tensor:
    """Deletion and insertion curves, mean over images, one line per map (AUC in the legend)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, res in scores.items():
        x = res["fractions"].tolist()
        style = dict(color="grey", linestyle="--") if name == "random" else {}
        for ax, kind in zip(axes, ("deletion", "insertion")):
            ax.plot(x, res[f"{kind}_curve"].mean(0).cpu().tolist(), marker=".", **style,
                    label=f"{name} (AUC {float(res[f'{kind}_auc'].mean()):.3f})")
    for ax, kind, better in zip(axes, ("deletion", "insertion"), ("lower", "higher")):
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set(xlabel=f"fraction of pixels {'deleted' if kind == 'deletion' else 'inserted'} (most important first)",
               ylabel="f / f(x_t)", title=f"{kind} ({better} AUC = more faithful)")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    return render(fig, path)


def maps_figure(rows: list[tuple[int, torch.Tensor, torch.Tensor]], path: Path) -> torch.Tensor:
    """One row per prototype: images where it fires with its information map over them."""
    cols = max(len(imgs) for _, imgs, _ in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.2 * cols, 1.3 * len(rows)), squeeze=False)
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


def score_figure(score: torch.Tensor, flagged: list[int], path: Path, threshold: Optional[float] = None) -> torch.Tensor:
    """Explained-away scores, best first; flagged in red; `threshold`: the score the calibrated test needed."""
    order = score.argsort(descending=True)[: min(15, len(score))]
    fig, ax = plt.subplots(figsize=(6, 2.8))
    colours = ["tab:red" if int(j) in flagged else "tab:gray" for j in order]
    ax.bar(range(len(order)), score[order].tolist(), color=colours)
    if threshold is not None and threshold == threshold:
        ax.axhline(threshold, color="k", linestyle="--", linewidth=0.8, label="needed to be flagged (chance level)")
        ax.legend(fontsize=7)
    ax.set_xticks(range(len(order)), [f"p{int(j)}" for j in order], fontsize=7)
    ax.set(ylabel="AUROC explained by a confounder", title="shortcut ranking (red: flagged)")
    return render(fig, path)


def unexplained_figure(image: torch.Tensor, effect: torch.Tensor, unexplained: torch.Tensor, peak: tuple[int, int],
                       title: str, path: Optional[Path] = None) -> torch.Tensor:
    """An example image, the pixel effect map and the part of it no prototype covers, peak marked."""
    fig, axes = plt.subplots(1, 3, figsize=(6.6, 2.4))
    panels = [(display_image(image), "gray", "example image", None),
              (effect.float().cpu(), "coolwarm", "effect size (confounder − none)", float(effect.abs().max()) or 1.0),
              (unexplained.float().cpu(), "inferno", "no prototype looks here", None)]
    for ax, (img, cmap, name, v) in zip(axes, panels):
        ax.imshow(img, cmap=cmap, vmin=-v if v else None, vmax=v, interpolation="nearest")
        ax.plot(peak[1], peak[0], marker="o", markerfacecolor="none", markeredgecolor="lime", markersize=12)
        ax.set_title(name, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=8)
    return render(fig, path)


def worst_group_figure(labels: Sequence[str], before: Sequence[float], after: Sequence[float], balanced: Sequence[float],
                       path: Optional[Path] = None) -> torch.Tensor:
    """Worst-group accuracy per finding: the classifier as trained, with the finding neutralised, and the
    group-balanced-training baseline."""
    fig, ax = plt.subplots(figsize=(1.8 + 1.4 * len(labels), 2.8))
    x = torch.arange(len(labels)).float()
    for k, (vals, name, colour) in enumerate(((before, "as trained", "tab:gray"), (after, "finding neutralised", "tab:green"),
                                              (balanced, "group-balanced training", "tab:blue"))):
        ax.bar((x + (k - 1) * 0.27).tolist(), list(vals), width=0.27, label=name, color=colour)
    ax.set_xticks(x.tolist(), list(labels), fontsize=7)
    ax.set(ylim=(0, 1), ylabel="worst-group accuracy", title="mitigation: worst group of target × confounder (held-out)")
    ax.legend(fontsize=6)
    return render(fig, path)


def sweep_figure(levels: Sequence[float], series: dict[str, Sequence[float]], path: Optional[Path] = None,
                 limits: Optional[dict[str, tuple[float, float]]] = None) -> torch.Tensor:
    """One panel per metric of the contamination sweep, against the share of the target carrying the marker.
    `limits` fixes a panel's y range (e.g. AUROC 0.5–1), so 0.9995 against 1.0 does not fill the panel."""
    fig, axes = plt.subplots(1, len(series), figsize=(2.4 * len(series), 2.4), squeeze=False)
    for ax, (name, vals) in zip(axes[0], series.items()):
        ax.plot([100 * v for v in levels], [float("nan") if v is None else v for v in vals], marker="o")
        if limits and name in limits:
            lo, hi = limits[name]
            ax.set_ylim(lo - 0.04 * (hi - lo), hi + 0.04 * (hi - lo))
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("% of target with marker", fontsize=7)
        ax.tick_params(labelsize=7)
    return render(fig, path)


def save_png(image: torch.Tensor, path: Path) -> Path:
    """A uint8 (3, H, W) image (a grid or a rendered figure) as a PNG file."""
    write_png(image.cpu(), str(path))
    return Path(path)
