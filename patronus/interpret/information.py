"""Where and when a prototype matters, measured in nats: conditional pointwise information.

Kong et al. (ICLR 2024, "Interpretable diffusion via information decomposition") write the
pointwise mutual information between an image and its condition as an integral over log-SNR
of the gap between two denoisers' MSEs. Patronus conditions on a vector s, so we need no
unconditional model: the information that prototype J adds, given all the others, compares
the denoiser under the image's own s with the denoiser under s with s_J set to a baseline:

    i(x; s_J | s_−J) = ½ ∫ E_ε ‖ε̂(x_α | s) − ε̂(x_α | s_J = b_J, s_−J)‖² dα,
    α = log SNR = log(ᾱ_t / (1 − ᾱ_t)),  x_α = √ᾱ_t x + √(1−ᾱ_t) ε.

The squared difference summed over channels but not pixels is a "where" map (it sums to the
image-level value), the integrand at each timestep is a "when" curve (the α-density). Every
condition compared at a timestep sees the *same* x_t (same t, same ε), so the Monte-Carlo
noise of the reference prediction cancels and 0 comes out exactly when nothing was changed.

The integral is a trapezoid rule over the schedule's own α range (for the linear schedule
[α(T−1), α(0)] ≈ [−10.1, 9.2]); a trained-for-minutes denoiser's density does not vanish at
either end (on the tiny MNIST model most of it sits at t < 100), so the totals depend on that
range: compare prototypes of one model, not numbers across schedules.

DiffusionPID (Dewan et al. 2024) splits the joint information of two conditions with the
MMI rule (redundancy = min); `pairwise_decomposition` does that per pixel for prototype pairs.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg")  # no display on servers/CI; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from einops import rearrange, reduce  # noqa: E402

from patronus.interpret.figures import render  # noqa: E402
from patronus.models.patronus import PatronusModel

Baseline = Union[str, float, torch.Tensor]


@dataclass
class InformationResult:
    """Information of each alternative condition (a prototype set to its baseline) about each image."""

    pixel: torch.Tensor  # (B, P, H, W) "where": ½∫ E‖Δε̂‖²_channels dα per pixel, in nats
    curve: torch.Tensor  # (B, P, S) "when": α-density ½ E‖Δε̂‖² (pixel sum) at each grid timestep
    timesteps: torch.Tensor  # (S,) the quadrature grid, increasing t (decreasing log-SNR)
    total: torch.Tensor  # (B, P) image-level information = pixel.sum((H, W))
    labels: list  # what each of the P alternatives is (a prototype index, or a pair)
    weights: Optional[torch.Tensor] = None  # (S,) trapezoid weights: total = (curve * weights).sum(-1)
    num_noise: Optional[int] = None  # ε draws per node and their seed: what another call needs to
    seed: Optional[int] = None  # see the same x_t (pairwise_decomposition reuses single edits)


# --- quadrature over log-SNR -------------------------------------------------------------


def timestep_grid(model: PatronusModel, num_timesteps: int, spacing: str = "log_snr") -> torch.Tensor:
    """Quadrature nodes over [0, T−1] (increasing, unique integer timesteps, both ends included).

    "log_snr" (default) spaces them evenly in α and snaps to the nearest timestep: the linear
    schedule packs half of the α range into the first ~10% of t, where the ε-form density is
    largest, so an even-in-t grid under-resolves it (on the tiny MNIST model 10 even-in-t
    nodes miss 15–35% of a 200-node reference, 10 even-in-α nodes ≤ 5%). "t" spaces them
    evenly in t. Snapping can merge nodes near t = 0 beyond ~25 nodes for T = 1000.
    """
    T = model.config.num_train_timesteps
    if not 1 < num_timesteps <= T:
        raise ValueError(f"num_timesteps={num_timesteps}: need 2..T={T} points for a quadrature")
    if spacing == "t":
        return torch.linspace(0, T - 1, num_timesteps).round().long().unique()
    if spacing != "log_snr":
        raise ValueError(f"spacing={spacing!r}: expected 'log_snr' or 't'")
    alpha = log_snr(model, torch.arange(T))  # (T,) decreasing
    targets = torch.linspace(float(alpha[-1]), float(alpha[0]), num_timesteps, dtype=alpha.dtype)
    return (alpha[None] - targets[:, None]).abs().argmin(1).unique()


def log_snr(model: PatronusModel, timesteps: torch.Tensor) -> torch.Tensor:
    """α_t = log(ᾱ_t / (1 − ᾱ_t)) in float64 (decreasing in t)."""
    a = model.noise_scheduler().alphas_cumprod.double()[timesteps.cpu()]
    return a.log() - (-a).log1p()


def trapezoid_weights(alpha: torch.Tensor) -> torch.Tensor:
    """Weights w with Σ_i w_i g(α_i) ≈ ∫ g dα over [min α, max α] (trapezoid rule, any spacing).

    Nodes must be monotone in α (a sorted timestep grid is). They are snapped to integer
    timesteps, so even a log-SNR grid is not exactly even in α: each node carries half of
    |Δα| of each neighbouring interval, and the weights sum to max α − min α.
    """
    gaps = (alpha[1:] - alpha[:-1]).abs()  # (S−1,)
    w = torch.zeros_like(alpha)
    w[:-1] += gaps / 2
    w[1:] += gaps / 2
    return w


# --- conditions --------------------------------------------------------------------------


def resolve_baseline(baseline: Baseline, num_prototypes: int, stats: Union[dict, torch.Tensor, None] = None) -> torch.Tensor:
    """A baseline (K,) (or (B, K)) from "zero", "median" (+ activation statistics), a number or a tensor.

    `stats` is the dict of `patronus.interpret.stats.activation_statistics` (its "quantiles"
    ["0.5"] is the per-prototype dataset median) or the median tensor (K,) itself.
    """
    if isinstance(baseline, torch.Tensor):
        return baseline.float()
    if isinstance(baseline, (int, float)):
        return torch.full((num_prototypes,), float(baseline))
    if baseline == "zero":
        return torch.zeros(num_prototypes)
    if baseline == "median":
        if stats is None:
            raise ValueError('baseline="median" needs the activation statistics (stats=...)')
        median = stats["quantiles"]["0.5"] if isinstance(stats, dict) else stats
        median = torch.as_tensor(median, dtype=torch.float32)
        if median.shape != (num_prototypes,):
            raise ValueError(f"median has shape {tuple(median.shape)}, expected ({num_prototypes},)")
        return median
    raise ValueError(f"baseline={baseline!r}: expected 'zero', 'median', a number or a tensor")


def with_baseline(s: torch.Tensor, prototypes: Sequence[int], baseline: torch.Tensor) -> torch.Tensor:
    """s (B, K) with every prototype in `prototypes` set to its baseline (K,) or (B, K) value."""
    base = baseline.to(s).expand_as(s)
    out = s.clone()
    idx = list(prototypes)
    out[:, idx] = base[:, idx]
    return out


def noise_draws(x0: torch.Tensor, num_noise: int, generator: torch.Generator) -> torch.Tensor:
    """(N, B, C, H, W) standard normal draws, made on the CPU so a seed means the same ε anywhere."""
    return torch.randn((num_noise, *x0.shape), generator=generator).to(x0.device)


def noisy(model: PatronusModel, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
    """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε via the training scheduler's `add_noise`."""
    sched = model.noise_scheduler()
    return sched.add_noise(x0, noise, torch.full((len(x0),), int(t), dtype=torch.long, device=x0.device))


# --- the estimator ------------------------------------------------------------------------


@torch.no_grad()
def _density_one_draw(model: PatronusModel, x_t: torch.Tensor, t: int, conditions: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """½‖ε̂(x_t|c_a) − ε̂(x_t|c_0)‖² summed over channels, for one shared x_t (B, C, H, W).

    conditions (B, A+1, K): index 0 is the reference s, 1..A the alternatives. All B·(A+1)
    (image, condition) pairs go through the denoiser as one batch, split into chunks.
    """
    B, A1, _ = conditions.shape
    flat = rearrange(conditions, "b a k -> (b a) k")
    image_of = torch.arange(B * A1, device=x_t.device) // A1  # which x_t each row denoises
    eps = []
    for i in range(0, B * A1, chunk_size):
        rows = image_of[i : i + chunk_size]
        eps.append(model(x_t[rows], torch.full((len(rows),), int(t), device=x_t.device), s=flat[i : i + chunk_size]).float())
    eps = torch.cat(eps)
    eps = rearrange(eps, "(b a) c h w -> b a c h w", b=B)
    diff = eps[:, 1:] - eps[:, :1]  # (B, A, C, H, W)
    return 0.5 * reduce(diff.pow(2), "b a c h w -> b a h w", "sum")


@torch.no_grad()
def pixel_density(
    model: PatronusModel, x0: torch.Tensor, conditions: torch.Tensor, t: int, noise: torch.Tensor, chunk_size: int = 256
) -> torch.Tensor:
    """Per-pixel α-density ½ E_ε ‖ε̂(x_t|c_a) − ε̂(x_t|c_0)‖²_channels (B, A, H, W) at timestep t.

    noise (N, B, C, H, W): the ε draws, shared by every condition.
    """
    total = 0.0
    for eps in noise:
        total = total + _density_one_draw(model, noisy(model, x0, eps, t), t, conditions, chunk_size)
    return total / len(noise)


@torch.no_grad()
def conditional_information(
    model: PatronusModel,
    x0: torch.Tensor,
    s: torch.Tensor,
    alternatives: torch.Tensor,
    num_timesteps: int = 20,
    num_noise: int = 4,
    seed: int = 0,
    timesteps: Optional[torch.Tensor] = None,
    chunk_size: int = 256,
    labels: Optional[list] = None,
) -> InformationResult:
    """½ ∫ E‖ε̂(x_α|s) − ε̂(x_α|s'_a)‖² dα per pixel, per timestep and per image, for each s'_a.

    s (B, K) is the reference condition, alternatives (B, A, K) the changed ones. One grid of
    timesteps (trapezoid weights |Δα|) and `num_noise` ε per timestep from `seed`, shared by
    all conditions, so results of different calls with the same seed and x0 are comparable.
    """
    grid = timestep_grid(model, num_timesteps) if timesteps is None else torch.as_tensor(timesteps).long().cpu().unique()
    if len(grid) < 2:
        raise ValueError(f"timesteps={grid.tolist()}: a quadrature needs at least 2 distinct timesteps")
    weights = trapezoid_weights(log_snr(model, grid)).float().to(x0.device)  # like curve, so curve·weights works anywhere
    conditions = torch.cat([s[:, None], alternatives.to(s)], dim=1)  # (B, A+1, K)
    gen = torch.Generator().manual_seed(seed)
    B, A = alternatives.shape[:2]
    pixel = x0.new_zeros(B, A, *x0.shape[-2:], dtype=torch.float32)
    curve = x0.new_zeros(B, A, len(grid), dtype=torch.float32)
    for i, t in enumerate(grid.tolist()):
        dens = pixel_density(model, x0, conditions, t, noise_draws(x0, num_noise, gen), chunk_size)  # (B, A, H, W)
        curve[..., i] = reduce(dens, "b a h w -> b a", "sum")
        pixel += weights[i] * dens
    labels = labels if labels is not None else list(range(A))
    return InformationResult(pixel, curve, grid, reduce(pixel, "b a h w -> b a", "sum"), labels, weights, num_noise, seed)


@torch.no_grad()
def prototype_information(
    model: PatronusModel,
    x0: torch.Tensor,
    prototypes: Sequence[int],
    baseline: Baseline = "zero",
    num_timesteps: int = 20,
    num_noise: int = 4,
    seed: int = 0,
    s: Optional[torch.Tensor] = None,
    stats: Union[dict, torch.Tensor, None] = None,
    timesteps: Optional[torch.Tensor] = None,
    chunk_size: int = 256,
) -> InformationResult:
    """i(x; s_J | s_−J) for each J in `prototypes`: what s_J tells the denoiser beyond the rest.

    `baseline` is what "without J" means: 0 (absent) or the dataset median (typical), as
    "zero" / "median" (with `stats`), or a (K,) / (B, K) tensor. s defaults to model.encode(x0).
    """
    s = model.encode(x0) if s is None else s
    base = resolve_baseline(baseline, s.shape[1], stats)
    alternatives = torch.stack([with_baseline(s, [j], base) for j in prototypes], dim=1)  # (B, P, K)
    return conditional_information(model, x0, s, alternatives, num_timesteps, num_noise, seed, timesteps, chunk_size,
                                   labels=list(prototypes))


@torch.no_grad()
def information_map_at(
    model: PatronusModel,
    x0: torch.Tensor,
    prototype: int,
    t: int,
    baseline_value: float,
    num_noise: int = 4,
    seed: int = 0,
    s: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The "where" density of one prototype at one timestep (B, H, W).

    Draws its ε exactly as `attribution.saliency_map` does for the same seed and num_noise,
    so the two maps describe the same x_t.
    """
    s = model.encode(x0) if s is None else s
    alt = s.clone()
    alt[:, prototype] = baseline_value
    noise = noise_draws(x0, num_noise, torch.Generator().manual_seed(seed))
    return pixel_density(model, x0, torch.stack([s, alt], dim=1), t, noise)[:, 0]


# --- partial information decomposition (MMI) ---------------------------------------------


def top_pairs(total: torch.Tensor, prototypes: Sequence[int], r: int) -> list[tuple[int, int]]:
    """The r prototype pairs with the largest summed mean image-level information (total (B, P))."""
    mean = dict(zip(prototypes, total.mean(0).tolist()))
    pairs = sorted(itertools.combinations(prototypes, 2), key=lambda p: -(mean[p[0]] + mean[p[1]]))
    return pairs[:r]


@torch.no_grad()
def pairwise_decomposition(
    model: PatronusModel,
    x0: torch.Tensor,
    pairs: Sequence[tuple[int, int]],
    baseline: Baseline = "zero",
    num_timesteps: int = 20,
    num_noise: int = 4,
    seed: int = 0,
    s: Optional[torch.Tensor] = None,
    stats: Union[dict, torch.Tensor, None] = None,
    timesteps: Optional[torch.Tensor] = None,
    chunk_size: int = 256,
    singles: Optional[InformationResult] = None,
) -> dict[str, torch.Tensor]:
    """Per-pixel MMI decomposition of i(x; s_J, s_L | rest) for each pair (J, L) → (B, npairs, H, W) maps.

    redundancy = min(i_J, i_L), unique_J = i_J − red, unique_L = i_L − red,
    synergy = i_JL − i_J − i_L + red (= i_JL − max(i_J, i_L)); the four add up to i_JL.
    Redundancy and unique terms are ≥ 0; pointwise synergy can be negative (the joint edit
    changes the prediction less than the stronger single edit). All single and joint edits
    share one set of ε, so the differences are not dominated by Monte-Carlo noise.

    `singles`: a `prototype_information` result for the same x0, s, baseline, seed and
    num_noise that covers every prototype of `pairs`. Its grid and ε are reused, so only the
    joint edits are computed (the CLI's main pass already paid for the single ones).
    """
    if not pairs:
        raise ValueError("pairs is empty: nothing to decompose")
    s = model.encode(x0) if s is None else s
    base = resolve_baseline(baseline, s.shape[1], stats)
    joint = torch.stack([with_baseline(s, list(p), base) for p in pairs], dim=1)  # (B, npairs, K)
    if singles is None:
        members = sorted({j for p in pairs for j in p})
        edits = torch.stack([with_baseline(s, [j], base) for j in members], dim=1)
        res = conditional_information(model, x0, s, torch.cat([edits, joint], 1), num_timesteps, num_noise, seed, timesteps, chunk_size)
        single_pixel, i_jl = res.pixel[:, : len(members)], res.pixel[:, len(members):]
    else:
        if (singles.seed, singles.num_noise) != (seed, num_noise) and singles.seed is not None:
            raise ValueError(f"singles were drawn with seed={singles.seed}, num_noise={singles.num_noise}; "
                             f"got seed={seed}, num_noise={num_noise}: the ε would differ")
        members, single_pixel = list(singles.labels), singles.pixel
        missing = sorted({j for p in pairs for j in p} - set(members))
        if missing:
            raise ValueError(f"singles has no single edit of prototypes {missing}")
        i_jl = conditional_information(model, x0, s, joint, num_noise=num_noise, seed=seed, timesteps=singles.timesteps,
                                       chunk_size=chunk_size).pixel
    col = {j: i for i, j in enumerate(members)}
    i_j = single_pixel[:, [col[j] for j, _ in pairs]]  # (B, npairs, H, W)
    i_l = single_pixel[:, [col[l] for _, l in pairs]]
    red = torch.minimum(i_j, i_l)
    return {
        "first": i_j,
        "second": i_l,
        "joint": i_jl,
        "redundancy": red,
        "unique_first": i_j - red,
        "unique_second": i_l - red,
        "synergy": i_jl - i_j - i_l + red,
    }


# --- figures -----------------------------------------------------------------------------


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


def when_figure(result: InformationResult, path: Optional[Path] = None, model: Optional[PatronusModel] = None) -> torch.Tensor:
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


PID_TERMS = ("first", "second", "joint", "redundancy", "unique_first", "unique_second", "synergy")


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


# --- CLI glue (wired into patronus.interpret.cli by the caller) ----------------------------


def add_information_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prototypes", type=int, nargs="+", help="default: all")
    parser.add_argument("--baseline", choices=("zero", "median"), default="zero",
                        help="what 'without prototype J' means: s_J = 0, or s_J = its dataset median")
    # Defaults sized for 2 CPU cores (K+1 conditions × images × nodes × draws denoiser passes): on the
    # tiny MNIST model 8 (10) log-SNR nodes are within ~2.5% (~1.7%) of a 60-node reference and 1 ε
    # per node adds ~1% spread to an image's total (the maps are noisier: raise --num-noise for smoother).
    parser.add_argument("--num-timesteps", type=int, default=8, help="quadrature nodes, even in log-SNR over [0, T−1]")
    parser.add_argument("--num-noise", type=int, default=1, help="ε draws per node (shared by all conditions)")
    parser.add_argument("--pairs", type=int, default=3, help="decompose the top-r prototype pairs (0: none)")


def _storable(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().cpu().contiguous()
    return x.float() if x.is_floating_point() else x


def run_information(args: argparse.Namespace, model: PatronusModel, refs: torch.Tensor, stats: dict, out: Path) -> dict:
    """Where/when maps for each prototype, PID of the top pairs; PNGs, raw tensors, summary numbers."""
    from safetensors.torch import save_file

    K = model.config.num_prototypes
    prototypes = list(dict.fromkeys(args.prototypes)) if args.prototypes is not None else list(range(K))  # dedupe, keep order
    bad = [j for j in prototypes if not 0 <= j < K]
    if bad:
        raise SystemExit(f"error: --prototypes {bad}: the model has K={K} prototypes")
    seed = getattr(args, "seed", 0)
    kw = dict(baseline=args.baseline, num_timesteps=args.num_timesteps, num_noise=args.num_noise, seed=seed, stats=stats)
    s = model.encode(refs)
    res = prototype_information(model, refs, prototypes, s=s, **kw)
    information_figure(refs, res, out / "information.png")
    when_figure(res, out / "information_when.png", model)
    tensors = {"pixel": res.pixel, "curve": res.curve, "timesteps": res.timesteps, "weights": res.weights,
               "log_snr": log_snr(model, res.timesteps), "total": res.total, "prototypes": torch.tensor(prototypes), "s": s}
    summary = {
        "images": len(refs),
        "baseline": args.baseline,
        "prototypes": prototypes,
        "timesteps": res.timesteps.tolist(),
        "num_noise": args.num_noise,
        "information_mean_nats": res.total.mean(0).tolist(),
        "when_argmax_timestep": res.timesteps[res.curve.mean(0).argmax(-1).cpu()].tolist(),
    }
    pairs = top_pairs(res.total, prototypes, args.pairs) if args.pairs > 0 and len(prototypes) > 1 else []
    if pairs:
        pid = pairwise_decomposition(model, refs, pairs, s=s, singles=res, **kw)  # reuses the single edits
        pid_figure(refs, pid, pairs, out / "pid.png")
        tensors |= {f"pid_{k}": v for k, v in pid.items()} | {"pairs": torch.tensor(pairs)}
        summary["pairs"] = [list(p) for p in pairs]
        summary["pid_mean_nats"] = {k: reduce(v, "b p h w -> p", "sum").div(len(refs)).tolist() for k, v in pid.items()}
    save_file({k: _storable(v) for k, v in tensors.items()}, str(out / "information.safetensors"))
    return summary
