"""Diffusion prior over standardised activation vectors s, for unconditional generation (Patronus §3.4).

s -> (s − μ)/σ -> a small MLP ε-predictor trained as a DDPM; samples go through a correct DDIM
update (diffusers' scheduler: every step uses its own timestep and the model's own noise
estimate, not fresh noise), then back to s, then the image denoiser decodes them.
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers import ConfigMixin, DDIMScheduler, DDPMScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn


class ActivationPrior(ModelMixin, ConfigMixin):
    """ε_φ(z_t, t) over z = standardised s; carries μ and σ so samples come back in s units."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, num_prototypes: int = 30, hidden: int = 256, depth: int = 3, num_train_timesteps: int = 1000):
        super().__init__()
        self.time_proj = Timesteps(hidden, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_emb = TimestepEmbedding(hidden, hidden)
        self.inp = nn.Linear(num_prototypes, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, num_prototypes))
        self.register_buffer("mean", torch.zeros(num_prototypes))
        self.register_buffer("std", torch.ones(num_prototypes))

    def scheduler(self) -> DDPMScheduler:
        # x̂0 clipped at ±6σ: z is standardised, and without it the first steps (ᾱ ≈ 0) amplify errors.
        return DDPMScheduler(num_train_timesteps=self.config.num_train_timesteps, beta_schedule="linear", clip_sample=True,
                             clip_sample_range=6.0)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_emb(self.time_proj(t.expand(len(z_t))).to(z_t.dtype))
        h = self.inp(z_t)
        for block in self.blocks:
            h = h + block(h + emb)  # residual MLP, time added at every block
        return self.out(h)

    @torch.enable_grad()  # callable from no_grad analysis code
    def fit(self, activations: torch.Tensor, steps: int = 3000, batch_size: int = 256, lr: float = 2e-3, seed: int = 0) -> list[float]:
        """Train on activations (N, K) of real images; returns the loss curve (every 100 steps)."""
        activations = activations.detach().to(self.mean.device)
        self.mean.copy_(activations.mean(0))
        self.std.copy_(activations.std(0).clamp_min(1e-6))
        z = (activations - self.mean) / self.std
        sched = self.scheduler()
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(self.parameters(), lr=lr)
        lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        losses = []
        self.train()
        for step in range(steps):
            x0 = z[torch.randint(0, len(z), (batch_size,), generator=gen)]
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=gen)
            loss = nn.functional.mse_loss(self(sched.add_noise(x0, noise, t), t), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_sched.step()
            if step % 100 == 0:
                losses.append(float(loss.detach()))
        self.eval()
        return losses

    @torch.no_grad()
    def sample(self, n: int, steps: int = 50, seed: int = 0, device: Optional[torch.device] = None) -> torch.Tensor:
        """n activation vectors (n, K) in s units (clamped at 0: log-similarities are never negative)."""
        sched = DDIMScheduler.from_config(self.scheduler().config, timestep_spacing="trailing", set_alpha_to_one=True)
        sched.set_timesteps(steps)
        z = torch.randn(n, self.config.num_prototypes, generator=torch.Generator().manual_seed(seed)).to(device or self.mean.device)
        for t in sched.timesteps:
            z = sched.step(self(z, t.to(z.device)), t, z).prev_sample
        return (z * self.std + self.mean).clamp_min(0)
