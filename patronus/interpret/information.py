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
either end (a trained-for-minutes model's can sit mostly at small t), so the totals depend on that
range: compare prototypes of one model, not numbers across schedules.

DiffusionPID (Dewan et al. 2024) splits the joint information of two conditions with the
MMI rule (redundancy = min); `pairwise_decomposition` does that per pixel for prototype pairs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from einops import rearrange, reduce

from patronus.edits import set_prototypes
from patronus.models.patronus import PatronusModel
from patronus.pipeline import PatronusPipeline

Baseline = Union[str, float, torch.Tensor]
# The low-level schedule helpers take the model (plots.when_figure passes one) or its pipeline.
ModelOrPipe = Union[PatronusModel, PatronusPipeline]


def _net(model: ModelOrPipe) -> PatronusModel:
    return model.model if isinstance(model, PatronusPipeline) else model


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


# The maps `pairwise_decomposition` returns, in the order figures show them.
PID_TERMS = ("first", "second", "joint", "redundancy", "unique_first", "unique_second", "synergy")


# --- quadrature over log-SNR -------------------------------------------------------------


def timestep_grid(model: ModelOrPipe, num_timesteps: int, spacing: str = "log_snr") -> torch.Tensor:
    """Quadrature nodes over [0, T−1] (increasing, unique integer timesteps, both ends included).

    "log_snr" (default) spaces them evenly in α and snaps to the nearest timestep: the linear
    schedule packs half of the α range into the first ~10% of t, where the ε-form density is
    largest, so an even-in-t grid under-resolves it (docs/benchmarks.md compares both against a
    fine reference). "t" spaces them evenly in t. Snapping can merge nodes near t = 0 beyond ~25 nodes for T = 1000.
    """
    T = _net(model).config.num_train_timesteps
    if not 1 < num_timesteps <= T:
        raise ValueError(f"num_timesteps={num_timesteps}: need 2..T={T} points for a quadrature")
    if spacing == "t":
        return torch.linspace(0, T - 1, num_timesteps).round().long().unique()
    if spacing != "log_snr":
        raise ValueError(f"spacing={spacing!r}: expected 'log_snr' or 't'")
    alpha = log_snr(model, torch.arange(T))  # (T,) decreasing
    targets = torch.linspace(float(alpha[-1]), float(alpha[0]), num_timesteps, dtype=alpha.dtype)
    return (alpha[None] - targets[:, None]).abs().argmin(1).unique()


def log_snr(model: ModelOrPipe, timesteps: torch.Tensor) -> torch.Tensor:
    """α_t = log(ᾱ_t / (1 − ᾱ_t)) in float64 (decreasing in t)."""
    a = _net(model).noise_scheduler().alphas_cumprod.double()[timesteps.cpu()]
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


def noise_draws(x0: torch.Tensor, num_noise: int, generator: torch.Generator) -> torch.Tensor:
    """(N, B, C, H, W) standard normal draws, made on the CPU so a seed means the same ε anywhere."""
    return torch.randn((num_noise, *x0.shape), generator=generator).to(x0.device)


def noisy(model: ModelOrPipe, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
    """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε via the training scheduler's `add_noise`."""
    sched = _net(model).noise_scheduler()
    return sched.add_noise(x0, noise, torch.full((len(x0),), int(t), dtype=torch.long, device=x0.device))


# --- the estimator ------------------------------------------------------------------------


def _check_prototypes(prototypes: Sequence[int], num_prototypes: int, name: str = "prototypes") -> None:
    bad = [j for j in prototypes if not 0 <= j < num_prototypes]
    if bad:
        raise ValueError(f"{name} {bad}: the model has K={num_prototypes} prototypes (0..{num_prototypes - 1})")


def _check_num_noise(num_noise: int) -> None:
    if num_noise < 1:
        raise ValueError(f"num_noise={num_noise}; expected at least 1 ε draw")


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


def pixel_density(
    pipe: PatronusPipeline, x0: torch.Tensor, conditions: torch.Tensor, t: int, noise: torch.Tensor, chunk_size: int = 256
) -> torch.Tensor:
    """Per-pixel α-density ½ E_ε ‖ε̂(x_t|c_a) − ε̂(x_t|c_0)‖²_channels (B, A, H, W) at timestep t.

    conditions (B, A+1, K): index 0 the reference, 1..A the alternatives; noise (N, B, C, H, W):
    the ε draws, shared by every condition. Results on the pipeline's device.
    """
    _check_num_noise(len(noise))
    x0, conditions, noise = x0.to(pipe.device), conditions.to(pipe.device), noise.to(pipe.device)
    total = 0.0
    with pipe.inference():
        for eps in noise:
            total = total + _density_one_draw(pipe.model, noisy(pipe.model, x0, eps, t), t, conditions, chunk_size)
    return total / len(noise)


def conditional_information(
    pipe: PatronusPipeline,
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
    Results on the pipeline's device.
    """
    _check_num_noise(num_noise)
    x0 = x0.to(pipe.device)
    s = s.to(x0.device)
    if s.ndim != 2 or len(s) != len(x0):
        raise ValueError(f"s has shape {tuple(s.shape)}; expected (B, K) with B={len(x0)} images")
    if alternatives.ndim != 3 or alternatives.shape[0] != len(s) or alternatives.shape[2] != s.shape[1]:
        raise ValueError(f"alternatives has shape {tuple(alternatives.shape)}; expected (B, A, K) = ({len(s)}, A, {s.shape[1]})")
    grid = timestep_grid(pipe, num_timesteps) if timesteps is None else torch.as_tensor(timesteps).long().cpu().unique()
    if len(grid) < 2:
        raise ValueError(f"timesteps={grid.tolist()}: a quadrature needs at least 2 distinct timesteps")
    T = pipe.model.config.num_train_timesteps
    if int(grid[0]) < 0 or int(grid[-1]) >= T:
        raise ValueError(f"timesteps={grid.tolist()}: the model has T={T} timesteps (0..{T - 1})")
    weights = trapezoid_weights(log_snr(pipe, grid)).float().to(x0.device)  # like curve, so curve·weights works anywhere
    conditions = torch.cat([s[:, None], alternatives.to(s)], dim=1)  # (B, A+1, K)
    gen = torch.Generator().manual_seed(seed)
    B, A = alternatives.shape[:2]
    pixel = x0.new_zeros(B, A, *x0.shape[-2:], dtype=torch.float32)
    curve = x0.new_zeros(B, A, len(grid), dtype=torch.float32)
    with pipe.inference():
        for i, t in enumerate(grid.tolist()):
            dens = pixel_density(pipe, x0, conditions, t, noise_draws(x0, num_noise, gen), chunk_size)  # (B, A, H, W)
            curve[..., i] = reduce(dens, "b a h w -> b a", "sum")
            pixel += weights[i] * dens
    labels = labels if labels is not None else list(range(A))
    return InformationResult(pixel, curve, grid, reduce(pixel, "b a h w -> b a", "sum"), labels, weights, num_noise, seed)


def prototype_information(
    pipe: PatronusPipeline,
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
    "zero" / "median" (with `stats`), or a (K,) / (B, K) tensor. s defaults to pipe.encode(x0).s.
    """
    _check_prototypes(prototypes, pipe.num_prototypes)
    x0 = x0.to(pipe.device)
    s = pipe.encode(x0).s if s is None else s.to(x0.device)
    base = resolve_baseline(baseline, s.shape[1], stats)
    alternatives = torch.stack([set_prototypes(s, [j], base) for j in prototypes], dim=1)  # (B, P, K)
    return conditional_information(
        pipe, x0, s, alternatives, num_timesteps, num_noise, seed, timesteps, chunk_size, labels=list(prototypes)
    )


def information_map_at(
    pipe: PatronusPipeline,
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
    _check_prototypes([prototype], pipe.num_prototypes, "prototype")
    _check_num_noise(num_noise)
    x0 = x0.to(pipe.device)
    s = pipe.encode(x0).s if s is None else s.to(x0.device)
    alt = set_prototypes(s, [prototype], baseline_value)
    noise = noise_draws(x0, num_noise, torch.Generator().manual_seed(seed))
    return pixel_density(pipe, x0, torch.stack([s, alt], dim=1), t, noise)[:, 0]


# --- partial information decomposition (MMI) ---------------------------------------------


def top_pairs(total: torch.Tensor, prototypes: Sequence[int], r: int) -> list[tuple[int, int]]:
    """The r prototype pairs with the largest summed mean image-level information (total (B, P))."""
    mean = dict(zip(prototypes, total.mean(0).tolist()))
    pairs = sorted(itertools.combinations(prototypes, 2), key=lambda p: -(mean[p[0]] + mean[p[1]]))
    return pairs[:r]


def pairwise_decomposition(
    pipe: PatronusPipeline,
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
    _check_prototypes(sorted({j for p in pairs for j in p}), pipe.num_prototypes, "pairs")
    x0 = x0.to(pipe.device)
    s = pipe.encode(x0).s if s is None else s.to(x0.device)
    base = resolve_baseline(baseline, s.shape[1], stats)
    joint = torch.stack([set_prototypes(s, list(p), base) for p in pairs], dim=1)  # (B, npairs, K)
    if singles is None:
        members = sorted({j for p in pairs for j in p})
        edits = torch.stack([set_prototypes(s, [j], base) for j in members], dim=1)
        res = conditional_information(pipe, x0, s, torch.cat([edits, joint], 1), num_timesteps, num_noise, seed, timesteps, chunk_size)
        single_pixel, i_jl = res.pixel[:, : len(members)], res.pixel[:, len(members) :]
    else:
        if (singles.seed, singles.num_noise) != (seed, num_noise) and singles.seed is not None:
            raise ValueError(
                f"singles were drawn with seed={singles.seed}, num_noise={singles.num_noise}; "
                f"got seed={seed}, num_noise={num_noise}: the ε would differ"
            )
        members, single_pixel = list(singles.labels), singles.pixel
        missing = sorted({j for p in pairs for j in p} - set(members))
        if missing:
            raise ValueError(f"singles has no single edit of prototypes {missing}")
        i_jl = conditional_information(
            pipe, x0, s, joint, num_noise=num_noise, seed=seed, timesteps=singles.timesteps, chunk_size=chunk_size
        ).pixel
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
