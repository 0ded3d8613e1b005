"""Fitting the diffusion prior over activations (Patronus §3.4) on real images' s."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from patronus.models.prior import ActivationPrior

if TYPE_CHECKING:
    from patronus.pipeline import PatronusPipeline


@torch.enable_grad()  # callable from no_grad analysis code
def fit_prior(
    prior: ActivationPrior, activations: torch.Tensor, steps: int = 3000, batch_size: int = 256, lr: float = 2e-3, seed: int = 0
) -> list[float]:
    """Train `prior` as a DDPM on activations (N, K) of real images; returns the loss every 100 steps."""
    if steps < 1 or len(activations) < 2:
        raise ValueError(f"fit_prior: need steps ≥ 1 and at least 2 activation vectors (got steps={steps}, N={len(activations)})")
    activations = activations.detach().to(prior.mean.device)
    prior.mean.copy_(activations.mean(0))
    prior.std.copy_(activations.std(0).clamp_min(1e-6))
    z = prior.standardise(activations)
    sched = prior.scheduler()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(prior.parameters(), lr=lr)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    prior.train()
    for step in range(steps):
        x0 = z[torch.randint(0, len(z), (batch_size,), generator=gen)]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=gen)
        loss = nn.functional.mse_loss(prior(sched.add_noise(x0, noise, t), t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        if step % 100 == 0:
            losses.append(float(loss.detach()))
    prior.eval()
    return losses


def train_activation_prior(
    pipe: PatronusPipeline, images: torch.Tensor, steps: int = 3000, seed: int = 0
) -> tuple[ActivationPrior, list[float]]:
    """A fresh `ActivationPrior` fitted (`fit_prior`) on s = g(x0) of real `images`, and registered on
    `pipe`, whose `generate` then draws from it; returns it and the loss every 100 steps."""
    activations = pipe.encode(images).s
    prior = ActivationPrior(num_prototypes=pipe.num_prototypes)
    losses = fit_prior(prior, activations.cpu(), steps=steps, seed=seed)
    pipe.register_modules(prior=prior.to(pipe.device))
    return prior, losses
