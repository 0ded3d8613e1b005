"""Training losses on diffusers' noise schedule (sampling and inversion: `patronus.pipeline`, `patronus.sampling`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from patronus.edits import hold_prototypes
from patronus.models.patronus import PatronusModel


def distinct_loss(prototypes: torch.Tensor, margin: float, exempt: Sequence[int] = ()) -> torch.Tensor:
    """Patronus L_distinct = mean_i ReLU(δ − min_{j≠i} (1 − |cos(p_i, p_j)|)): no two prototypes alike.
    `exempt` prototypes (copies of real patches, see `patronus.training.reseeding`) are left out."""
    if exempt:
        keep = torch.ones(len(prototypes), dtype=torch.bool, device=prototypes.device)
        keep[list(exempt)] = False
        prototypes = prototypes[keep]
    p = F.normalize(prototypes, dim=1)
    dissim = 1 - (p @ p.T).abs()  # (K, K)
    dissim = dissim + torch.eye(len(p), device=p.device) * 2  # exclude j == i (dissim ≤ 1 elsewhere)
    return F.relu(margin - dissim.min(dim=1).values).mean()


def reconstruction_loss(decoder: nn.Module, z: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """‖dec(f(x0)) − x0‖² (Li et al. 2018, Eq. 2's R term); `PrototypeEncoder.feature_decoder` returns
    images of the input's size."""
    return F.mse_loss(decoder(z).float(), x0.float())


def diffusion_loss(
    model: PatronusModel,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    snr_gamma: Optional[float] = None,
    held: Optional[dict[int, float]] = None,
    s: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoising MSE (on ε, or on v for `prediction="v"` models) with s = g(x0) from the clean image,
    gradients into the encoder.

    `snr_gamma` turns on Min-SNR-γ weighting (Hang et al. 2023), which converges faster in
    short runs; None is the paper's plain MSE. `held` fixes prototypes at constant values in the
    condition (shortcut mitigation: the denoiser can no longer use them). `s`: the activations
    g(x0) when the caller already computed them (with gradients). Returns (loss, activations s).
    """
    b = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), device=x0.device)
    noise = torch.randn_like(x0)
    x_t = scheduler.add_noise(x0, noise, t)
    s = model.encode(x0) if s is None else s
    cond = s
    if held:
        cond = hold_prototypes(s, held)
    eps = model(x_t, t, s=cond)
    per_sample = F.mse_loss(eps.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
    alpha_bar = scheduler.alphas_cumprod.to(x0.device)[t].float()
    snr = alpha_bar / (1 - alpha_bar)
    if model.config.prediction == "v":
        # ‖ε̂ − ε‖² = ᾱ‖v̂ − v‖², so the v loss is ‖ε̂ − ε‖²/ᾱ = (SNR + 1)·‖x̂0 − x0‖². Min-SNR-γ
        # clips that x0 weight at γ + 1 (Hang et al. 2023): weight min(SNR + 1, γ + 1)/(SNR + 1) on ‖v̂ − v‖².
        # Unlike ε-Min-SNR (x0 weight min(SNR, γ) → 0 as t → T), the high-noise steps that lay out
        # the image keep a weight of 1.
        x0_weight = (snr + 1).clamp(max=snr_gamma + 1) if snr_gamma is not None else snr + 1
        per_sample = per_sample * x0_weight / snr
    elif snr_gamma is not None:
        per_sample = per_sample * snr.clamp(max=snr_gamma) / snr
    loss = per_sample.mean()
    return loss, s


def clean_estimate(scheduler: DDPMScheduler, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x̂0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t (DDPM Eq. 15), clamped to the data range, in fp32."""
    alpha_bar = scheduler.alphas_cumprod.to(x_t.device)[t].float().view(-1, 1, 1, 1)
    return ((x_t.float() - (1 - alpha_bar).sqrt() * eps.float()) / alpha_bar.sqrt()).clamp(-1, 1)
