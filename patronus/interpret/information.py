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

    The grid is even in t, not in α (the linear schedule packs most of the α range into the
    first steps), so each node carries half of |Δα| of each neighbouring interval.
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
    grid = timestep_grid(model, num_timesteps) if timesteps is None else torch.as_tensor(timesteps).long().sort().values
    weights = trapezoid_weights(log_snr(model, grid)).float()
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
    return InformationResult(pixel, curve, grid, reduce(pixel, "b a h w -> b a", "sum"), labels)


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
) -> dict[str, torch.Tensor]:
    """Per-pixel MMI decomposition of i(x; s_J, s_L | rest) for each pair (J, L) → (B, npairs, H, W) maps.

    redundancy = min(i_J, i_L), unique_J = i_J − red, unique_L = i_L − red,
    synergy = i_JL − i_J − i_L + red (= i_JL − max(i_J, i_L)); the four add up to i_JL.
    Redundancy and unique terms are ≥ 0; pointwise synergy can be negative (the joint edit
    changes the prediction less than the stronger single edit). All single and joint edits
    share one set of ε, so the differences are not dominated by Monte-Carlo noise.
    """
    s = model.encode(x0) if s is None else s
    base = resolve_baseline(baseline, s.shape[1], stats)
    singles = sorted({j for p in pairs for j in p})
    edits = [[j] for j in singles] + [list(p) for p in pairs]
    alternatives = torch.stack([with_baseline(s, e, base) for e in edits], dim=1)  # (B, |singles|+npairs, K)
    res = conditional_information(model, x0, s, alternatives, num_timesteps, num_noise, seed, timesteps, chunk_size)
    col = {j: i for i, j in enumerate(singles)}
    i_j = res.pixel[:, [col[j] for j, _ in pairs]]  # (B, npairs, H, W)
    i_l = res.pixel[:, [col[l] for _, l in pairs]]
    i_jl = res.pixel[:, len(singles):]
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


def _overlay(ax, image: torch.Tensor, heat: torch.Tensor, vmax: float, cmap: str = "inferno", vmin: float = 0.0):
    ax.imshow(display_image(image), cmap="gray", vmin=0, vmax=1)
    im = ax.imshow(heat.detach().float().cpu(), cmap=cmap, vmin=vmin, vmax=vmax, alpha=0.65, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def information_figure(images: torch.Tensor, result: InformationResult, path: Optional[Path] = None, max_images: int = 8) -> torch.Tensor:
    """Per image a row: the image, then each prototype's "where" map over it (uint8 (3, H, W)).

    One colour scale per row, so within an image the prototypes are comparable; the number
    above each map is its image-level information in nats.
    """
    B, P = min(len(images), max_images), result.pixel.shape[1]
    fig, axes = plt.subplots(B, P + 1, figsize=(1.3 * (P + 1), 1.4 * B), squeeze=False)
    for b in range(B):
        axes[b, 0].imshow(display_image(images[b]), cmap="gray", vmin=0, vmax=1)
        axes[b, 0].set_axis_off()
        vmax = float(result.pixel[b].max()) or 1.0
        for p in range(P):
            _overlay(axes[b, p + 1], images[b], result.pixel[b, p], vmax)
            title = f"p{result.labels[p]}: " if b == 0 else ""
            axes[b, p + 1].set_title(f"{title}{float(result.total[b, p]):.2g}", fontsize=7)
    fig.suptitle("where: ½∫E‖Δε̂‖² dα per pixel (nats per image above each map)", fontsize=8)
    return render(fig, path)


def when_figure(result: InformationResult, path: Optional[Path] = None) -> torch.Tensor:
    """The α-density ½E‖Δε̂‖² against timestep, mean over images, one line per prototype."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    mean = result.curve.mean(0).cpu()  # (P, S)
    for p, label in enumerate(result.labels):
        ax.plot(result.timesteps.tolist(), mean[p].tolist(), marker=".", label=f"p{label}")
    ax.set(xlabel="timestep t (noisier →)", ylabel="½ E‖Δε̂‖²  (nats per unit log-SNR)", yscale="log",
           title="when: information density per timestep")
    ax.legend(fontsize=6, ncol=max(1, len(result.labels) // 10), loc="best")
    return render(fig, path)


PID_TERMS = ("first", "second", "joint", "redundancy", "unique_first", "unique_second", "synergy")


def pid_figure(images: torch.Tensor, pid: dict[str, torch.Tensor], pairs: Sequence[tuple[int, int]],
               path: Optional[Path] = None, max_images: int = 4) -> torch.Tensor:
    """Rows (pair, image): the image then i_J, i_L, i_JL, redundancy, unique J, unique L, synergy."""
    B = min(len(images), max_images)
    rows = [(k, b) for k in range(len(pairs)) for b in range(B)]
    fig, axes = plt.subplots(len(rows), len(PID_TERMS) + 1, figsize=(1.3 * (len(PID_TERMS) + 1), 1.4 * len(rows)), squeeze=False)
    for r, (k, b) in enumerate(rows):
        j, l = pairs[k]
        axes[r, 0].imshow(display_image(images[b]), cmap="gray", vmin=0, vmax=1)
        axes[r, 0].set_axis_off()
        axes[r, 0].set_title(f"p{j}+p{l}", fontsize=7)
        vmax = float(pid["joint"][b, k].max().clamp_min(pid["first"][b, k].max()).clamp_min(pid["second"][b, k].max())) or 1.0
        for c, term in enumerate(PID_TERMS):
            m = pid[term][b, k]
            if term == "synergy":
                _overlay(axes[r, c + 1], images[b], m, vmax, cmap="RdBu_r", vmin=-vmax)
            else:
                _overlay(axes[r, c + 1], images[b], m, vmax)
            name = term.replace("first", f"p{j}").replace("second", f"p{l}")
            axes[r, c + 1].set_title(f"{name}\n{float(m.sum()):.2g}" if r == 0 else f"{float(m.sum()):.2g}", fontsize=6)
    fig.suptitle("MMI decomposition per pixel (nats per image above each map)", fontsize=8)
    return render(fig, path)


# --- CLI glue (wired into patronus.interpret.cli by the caller) ----------------------------


def add_information_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prototypes", type=int, nargs="+", help="default: all")
    parser.add_argument("--baseline", choices=("zero", "median"), default="zero",
                        help="what 'without prototype J' means: s_J = 0, or s_J = its dataset median")
    parser.add_argument("--num-timesteps", type=int, default=20, help="quadrature nodes over [0, T−1]")
    parser.add_argument("--num-noise", type=int, default=4, help="ε draws per timestep (shared by all conditions)")
    parser.add_argument("--pairs", type=int, default=3, help="decompose the top-r prototype pairs (0: none)")


def _storable(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().cpu().contiguous()
    return x.float() if x.is_floating_point() else x


def run_information(args: argparse.Namespace, model: PatronusModel, refs: torch.Tensor, stats: dict, out: Path) -> dict:
    """Where/when maps for each prototype, PID of the top pairs; PNGs, raw tensors, summary numbers."""
    from safetensors.torch import save_file

    K = model.config.num_prototypes
    prototypes = args.prototypes if args.prototypes is not None else list(range(K))
    seed = getattr(args, "seed", 0)
    kw = dict(baseline=args.baseline, num_timesteps=args.num_timesteps, num_noise=args.num_noise, seed=seed, stats=stats)
    s = model.encode(refs)
    res = prototype_information(model, refs, prototypes, s=s, **kw)
    information_figure(refs, res, out / "information.png")
    when_figure(res, out / "information_when.png")
    tensors = {"pixel": res.pixel, "curve": res.curve, "timesteps": res.timesteps, "total": res.total,
               "prototypes": torch.tensor(prototypes), "s": s}
    summary = {
        "images": len(refs),
        "baseline": args.baseline,
        "prototypes": prototypes,
        "timesteps": res.timesteps.tolist(),
        "information_mean_nats": res.total.mean(0).tolist(),
        "when_argmax_timestep": res.timesteps[res.curve.mean(0).argmax(-1).cpu()].tolist(),
    }
    pairs = top_pairs(res.total, prototypes, args.pairs) if args.pairs > 0 and len(prototypes) > 1 else []
    if pairs:
        pid = pairwise_decomposition(model, refs, pairs, s=s, **kw)
        pid_figure(refs, pid, pairs, out / "pid.png")
        tensors |= {f"pid_{k}": v for k, v in pid.items()} | {"pairs": torch.tensor(pairs)}
        summary["pairs"] = [list(p) for p in pairs]
        summary["pid_mean_nats"] = {k: reduce(v, "b p h w -> p", "sum").div(len(refs)).tolist() for k, v in pid.items()}
    save_file({k: _storable(v) for k, v in tensors.items()}, str(out / "information.safetensors"))
    return summary
