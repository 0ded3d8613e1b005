"""Training loss, DDIM/DDPM sampling and DDIM inversion on diffusers' schedulers."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler
from torch import nn
from tqdm.auto import tqdm

from patronus.models.patronus import PatronusModel

# Called after every denoising step with (step index, timestep, x_t after the step, predicted x̂0).
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def distinct_loss(prototypes: torch.Tensor, margin: float) -> torch.Tensor:
    """Patronus L_distinct = mean_i ReLU(δ − min_{j≠i} (1 − |cos(p_i, p_j)|)): no two prototypes alike."""
    p = F.normalize(prototypes, dim=1)
    dissim = 1 - (p @ p.T).abs()  # (K, K)
    dissim = dissim + torch.eye(len(p), device=p.device) * 2  # exclude j == i (dissim ≤ 1 elsewhere)
    return F.relu(margin - dissim.min(dim=1).values).mean()


def diffusion_loss(
    model: PatronusModel, scheduler: DDPMScheduler, x0: torch.Tensor, snr_gamma: Optional[float] = None,
    held: Optional[dict[int, float]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise-prediction MSE with s = g(x0) from the clean image, gradients into the encoder.

    `snr_gamma` turns on Min-SNR-γ weighting (Hang et al. 2023), which converges faster in
    short runs; None is the paper's plain MSE. `held` fixes prototypes at constant values in the
    condition (shortcut mitigation: the denoiser can no longer use them). Returns (loss, activations s).
    """
    b = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), device=x0.device)
    noise = torch.randn_like(x0)
    x_t = scheduler.add_noise(x0, noise, t)
    s = model.encode(x0)
    cond = s
    if held:
        cond = s.clone()
        cond[:, list(held)] = torch.tensor(list(held.values()), dtype=s.dtype, device=s.device)
    eps = model(x_t, t, s=cond)
    per_sample = F.mse_loss(eps.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        alpha_bar = scheduler.alphas_cumprod.to(x0.device)[t]
        snr = alpha_bar / (1 - alpha_bar)
        per_sample = per_sample * snr.clamp(max=snr_gamma) / snr
    return per_sample.mean(), s


def ddim_scheduler(model: PatronusModel, num_steps: int, *, inverse: bool = False, clip: bool = True):
    """DDIM (or inverse DDIM) with trailing spacing, so decoding starts at t = T−1 and the
    inverse visits exactly the timesteps the forward pass will use."""
    cls = DDIMInverseScheduler if inverse else DDIMScheduler
    sched = cls.from_config(
        model.noise_scheduler().config, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=clip
    )
    sched.set_timesteps(num_steps)
    return sched


def _eps(model: nn.Module, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return model(x, t.expand(x.shape[0]).to(x.device), s=s)


@torch.no_grad()
def ddim_sample(
    model: PatronusModel,
    x_T: torch.Tensor,
    s: torch.Tensor,
    num_steps: int = 50,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    start_step: int = 0,
    callback: Optional[StepCallback] = None,
    progress: bool = False,
    clip: bool = True,
) -> torch.Tensor:
    """Decode x_T under condition s. eta=0 is deterministic; `start_step` skips the first steps
    (for partial-noise editing from an intermediate x_t)."""
    sched = ddim_scheduler(model, num_steps, clip=clip)
    x = x_T
    for i, t in enumerate(tqdm(sched.timesteps, desc="DDIM", disable=not progress, leave=False)):
        if i < start_step:
            continue
        out = sched.step(_eps(model, x, t, s), t, x, eta=eta, generator=generator)
        x = out.prev_sample
        if callback is not None:
            callback(i, int(t), x, out.pred_original_sample)
    return x


@torch.no_grad()
def ddpm_sample(
    model: PatronusModel,
    x_T: torch.Tensor,
    s: torch.Tensor,
    num_steps: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
) -> torch.Tensor:
    """Ancestral DDPM sampling (all T steps unless `num_steps` is given)."""
    sched = DDPMScheduler.from_config(model.noise_scheduler().config)
    sched.set_timesteps(num_steps or sched.config.num_train_timesteps)
    x = x_T
    for t in tqdm(sched.timesteps, desc="DDPM", disable=not progress, leave=False):
        x = sched.step(_eps(model, x, t, s), t, x, generator=generator).prev_sample
    return x


@torch.no_grad()
def ddim_invert(
    model: PatronusModel,
    x0: torch.Tensor,
    s: torch.Tensor,
    num_steps: int = 50,
    stop_step: Optional[int] = None,
    progress: bool = False,
) -> torch.Tensor:
    """Deterministic DDIM inversion x0 -> x_T under s (no clipping, so decode(invert(x0)) ≈ x0).

    `stop_step` inverts only that many steps, giving the x_t that `ddim_sample(...,
    start_step=num_steps - stop_step)` continues from.
    """
    sched = ddim_scheduler(model, num_steps, inverse=True, clip=False)
    x = x0
    for i, t in enumerate(tqdm(sched.timesteps, desc="invert", disable=not progress, leave=False)):
        if stop_step is not None and i >= stop_step:
            break
        x = sched.step(_eps(model, x, t, s), t, x).prev_sample
    return x
