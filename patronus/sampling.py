"""The one denoising loop of the package: decoding (DDIM/DDPM), inversion, partial decoding,
emergence tracing (its per-step callback sees x̂0) and the activation prior all run through it.

Plain tensors in and out: no model, no eval mode, no device handling (`PatronusPipeline` owns those).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

# Called after every step with (step index i, timestep t, x after the step, predicted x̂0).
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
# ε̂ for (x_t, t): the denoiser under a fixed condition (guided or not), or the activation prior.
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def denoise_loop(
    scheduler,
    x: torch.Tensor,
    eps: EpsFn,
    indices: Optional[range] = None,  # which steps of `scheduler.timesteps` to run; None = all of them
    callback: Optional[StepCallback] = None,  # None = nothing reported per step
    progress: Optional[Callable] = None,  # wraps the step iterator (a progress bar); None = no bar
    fixed_point: int = 0,  # extra ε̂ evaluations per step solving the implicit step; 0 = the explicit step
    corrections: Optional[torch.Tensor] = None,  # (steps, B, C, H, W) noise map added after step i; None = none
    **step_kwargs,
) -> torch.Tensor:
    """Run `scheduler`'s steps i ∈ `indices` on x; `step_kwargs` go to `scheduler.step` (eta, generator, ...).

    With a decoding scheduler i runs t from high to low (x_t → x_{t−1}); with `DDIMInverseScheduler`
    from low to high (x_{t−1} → x_t): the same loop inverts.

    `fixed_point` k > 0 spends k more denoiser calls per step solving the implicit step
    y = step(ε̂(y, t), t, x) (see `solve_implicit_step`): for inversion, the exact inverse of the
    DDIM decoding step that plain inversion approximates with ε̂(x, t).
    `corrections`: the noise maps of an edit-friendly inversion (`PatronusPipeline.invert_edit_friendly`).
    """
    timesteps = scheduler.timesteps
    indices = range(len(timesteps)) if indices is None else indices
    if len(indices) and not (0 <= indices[0] and indices[-1] < len(timesteps)):
        raise ValueError(f"steps {indices[0]}..{indices[-1]}: outside the scheduler's {len(timesteps)} steps")
    for i in progress(indices) if progress is not None else indices:
        t = timesteps[i]
        # 1. Predict the noise: ε̂ = ε_θ(x_t, t, s).
        e = eps(x, t)
        # 2. One scheduler step: x̂0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t, then for DDIM
        #    x_{t−1} = √ᾱ_{t−1}·x̂0 + √(1−ᾱ_{t−1}−σ_t²)·ε̂ + σ_t·z (Song et al. 2021, Eq. 12; σ_t = 0 unless
        #    eta > 0); DDPM draws x_{t−1} from q(x_{t−1} | x_t, x̂0); the inverse scheduler steps to higher t.
        out = scheduler.step(e, t, x, **step_kwargs)
        # 3. Fixed-point inversion: replace the explicit step by the solution of the implicit one.
        if fixed_point:
            out = solve_implicit_step(scheduler, eps, x, t, out, fixed_point, step_kwargs)
        # 4. Edit-friendly inversion: x_{t−1} = μ_t(x_t, ε̂) + c_t, this step's stored noise map.
        x = out.prev_sample if corrections is None else out.prev_sample + corrections[i].to(x)
        # 5. Report the step and its x̂0.
        if callback is not None:
            callback(i, int(t), x, out.pred_original_sample)
    return x


def solve_implicit_step(scheduler, eps: EpsFn, x: torch.Tensor, t: torch.Tensor, out, iterations: int, step_kwargs: dict):
    """Fixed-point iteration y ← G(y) = step(ε̂(y, t), t, x) from the explicit step's output,
    with Anderson(1) acceleration per image (the plain iteration converges linearly and slowly
    at the large steps of short schedules). Fixed-point inversion as in ReNoise (Garibi et al. 2024)."""
    y = out.prev_sample
    prev_y = prev_g = None
    for _ in range(iterations):
        out = scheduler.step(eps(y, t), t, x, **step_kwargs)
        g = out.prev_sample
        if prev_g is None:
            new = g
        else:
            r, dr = (g - y).flatten(1), ((g - y) - (prev_g - prev_y)).flatten(1)
            gamma = ((r * dr).sum(1) / (dr * dr).sum(1).clamp_min(1e-20)).view(-1, *[1] * (g.ndim - 1))
            new = g - gamma * (g - prev_g)
        prev_y, prev_g, y = y, g, new
    out.prev_sample = y
    return out
