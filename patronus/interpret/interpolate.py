"""Variations (same s, new x_T), interpolation (lerp s, slerp x_T) and extrapolation (sweep s_J)."""

from __future__ import annotations

from typing import Sequence

import torch

from patronus.diffusion import ddim_invert, ddim_sample
from patronus.models.patronus import PatronusModel


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation per sample: keeps Gaussian latents at a Gaussian norm (lerp shrinks them)."""
    fa, fb = a.flatten(1), b.flatten(1)
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1)).clamp_min(1e-8)
    omega = cos.clamp(-1, 1).acos()[:, None]
    so = omega.sin().clamp_min(1e-8)
    out = torch.where(omega < 1e-4, (1 - t) * fa + t * fb, (torch.sin((1 - t) * omega) * fa + torch.sin(t * omega) * fb) / so)
    return out.view_as(a)


@torch.no_grad()
def variations(model: PatronusModel, x0: torch.Tensor, n: int, steps: int = 50, seed: int = 0) -> torch.Tensor:
    """(n, B, C, H, W): each image's s decoded from n fresh latents: what s fixes and what it leaves free."""
    s = model.encode(x0)
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([ddim_sample(model, torch.randn(x0.shape, generator=gen).to(x0.device), s, steps) for _ in range(n)])


@torch.no_grad()
def interpolate(model: PatronusModel, x_a: torch.Tensor, x_b: torch.Tensor, n: int, steps: int = 50) -> torch.Tensor:
    """(n, B, C, H, W) from a to b: invert both, lerp s, slerp x_T; ends reconstruct a and b."""
    s_a, s_b = model.encode(x_a), model.encode(x_b)
    z_a, z_b = ddim_invert(model, x_a, s_a, steps), ddim_invert(model, x_b, s_b, steps)
    out = []
    for t in torch.linspace(0, 1, n).tolist():
        out.append(ddim_sample(model, slerp(z_a, z_b, t), torch.lerp(s_a, s_b, t), steps, clip=False))
    return torch.stack(out)


@torch.no_grad()
def extrapolate(model: PatronusModel, x0: torch.Tensor, prototype: int, values: Sequence[float], steps: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Sweep s_J over `values` (0 .. beyond its max) from the same inverted x_T.

    Returns images (V, B, C, H, W) and the re-encoded s_J of each (V, B): does the concept follow?
    """
    s = model.encode(x0)
    z = ddim_invert(model, x0, s, steps)
    imgs, measured = [], []
    for v in values:
        s_new = s.clone()
        s_new[:, prototype] = v
        img = ddim_sample(model, z, s_new, steps, clip=False)
        imgs.append(img)
        measured.append(model.encode(img)[:, prototype])
    return torch.stack(imgs), torch.stack(measured)
