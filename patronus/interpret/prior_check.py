"""Does the activation prior draw s like real images' s? Its draws against held-out activations.

The prior (Patronus §3.4) models standardised s; unconditional generation decodes its draws, so
a draw unlike any real s asks the image model for something it never saw. Per prototype k, over
N draws and the s = g(x0) of N real held-out images:
    mean error  = max_k |mean(draws_k) − mean(real_k)| / std(real_k)
    std ratio   = [min_k, max_k] of std(draws_k) / std(real_k)
    correlation = mean_{k,l} |corr(draws)_kl − corr(real)_kl|
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from patronus.pipeline import PatronusPipeline


@dataclass
class PriorCheck:
    held_out_images: int
    max_mean_error_in_std: float  # max_k |mean(draws_k) − mean(real_k)| / std(real_k); 0 = every mean matched
    std_ratio_range: list[float]  # [min_k, max_k] std(draws_k) / std(real_k); [1, 1] = every spread matched
    mean_abs_correlation_error: float  # mean |corr(draws) − corr(real)| over prototype pairs; 0 = matched

    def as_dict(self) -> dict:
        return asdict(self)


def prior_check(pipe: PatronusPipeline, held_out: torch.Tensor, steps: int = 50, seed: int = 0) -> PriorCheck:
    """Draw as many s from `pipe`'s activation prior (DDIM, `steps`) as there are real held-out images
    (N, C, H, W), and compare them with those images' s (module docstring)."""
    # 1. s = g(x0) of the real images; as many draws from the prior.
    real = pipe.encode(held_out).s.cpu()
    draws = pipe.sample_activations(len(real), steps=steps, seed=seed).cpu()
    # 2. Per-prototype mean, spread and pairwise correlation, against the real ones.
    sd = real.std(0).clamp_min(1e-8)
    ratio = draws.std(0) / sd
    return PriorCheck(
        held_out_images=len(real),
        max_mean_error_in_std=float(((draws.mean(0) - real.mean(0)).abs() / sd).max()),
        std_ratio_range=[float(ratio.min()), float(ratio.max())],
        mean_abs_correlation_error=float((torch.corrcoef(draws.T) - torch.corrcoef(real.T)).abs().mean()),
    )
