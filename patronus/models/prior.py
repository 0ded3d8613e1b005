"""Diffusion prior over standardised activation vectors s, for unconditional generation (Patronus §3.4).

s -> (s − μ)/σ -> a small MLP ε-predictor trained as a DDPM (`patronus.training.prior.fit_prior`);
`PatronusPipeline.sample_activations` draws from it with a correct DDIM update (diffusers'
scheduler: every step uses its own timestep and the model's own noise estimate, not fresh
noise), maps back to s, and the image denoiser decodes them.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, DDPMScheduler, ModelMixin
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
        return DDPMScheduler(
            num_train_timesteps=self.config.num_train_timesteps, beta_schedule="linear", clip_sample=True, clip_sample_range=6.0
        )

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_emb(self.time_proj(t.expand(len(z_t))).to(z_t.dtype))
        h = self.inp(z_t)
        for block in self.blocks:
            h = h + block(h + emb)  # residual MLP, time added at every block
        return self.out(h)

    def standardise(self, activations: torch.Tensor) -> torch.Tensor:
        """s → z = (s − μ)/σ, the space the prior is trained and sampled in."""
        return (activations - self.mean) / self.std

    def to_activations(self, z: torch.Tensor) -> torch.Tensor:
        """z → s (clamped at 0: log-similarities are never negative)."""
        return (z * self.std + self.mean).clamp_min(0)
