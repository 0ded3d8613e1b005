"""Variations (same s, new x_T), interpolation (lerp s, slerp x_T) and extrapolation (sweep s_J)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from patronus.edits import Edit
from patronus.pipeline import PatronusPipeline


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation per sample: keeps Gaussian latents at a Gaussian norm (lerp shrinks them)."""
    fa, fb = a.flatten(1), b.flatten(1)
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1)).clamp_min(1e-8)
    omega = cos.clamp(-1, 1).acos()[:, None]
    so = omega.sin().clamp_min(1e-8)
    out = torch.where(omega < 1e-4, (1 - t) * fa + t * fb, (torch.sin((1 - t) * omega) * fa + torch.sin(t * omega) * fb) / so)
    return out.view_as(a)


def variations(pipe: PatronusPipeline, x0: torch.Tensor, n: int, steps: int = 50, seed: int = 0) -> torch.Tensor:
    """(n, B, C, H, W): each image's s decoded from n fresh latents: what s fixes and what it leaves free."""
    s = pipe.encode(x0).s
    gen = torch.Generator().manual_seed(seed)  # one stream: variation k gets the k-th draw
    return torch.stack([pipe.sample(s, generator=gen, steps=steps) for _ in range(n)])


def interpolate(pipe: PatronusPipeline, x_a: torch.Tensor, x_b: torch.Tensor, n: int, steps: int = 50) -> torch.Tensor:
    """(n, B, C, H, W) from a to b: invert both, lerp s, slerp x_T; ends reconstruct a and b."""
    s_a, s_b = pipe.encode(x_a).s.to(pipe.device), pipe.encode(x_b).s.to(pipe.device)
    z_a, z_b = pipe.invert(x_a, s_a, steps), pipe.invert(x_b, s_b, steps)
    out = [pipe.denoise(slerp(z_a, z_b, t), torch.lerp(s_a, s_b, t), steps, clip=False) for t in torch.linspace(0, 1, n).tolist()]
    return torch.stack(out)


def extrapolate(
    pipe: PatronusPipeline, x0: torch.Tensor, prototype: int, values: Sequence[float], steps: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sweep s_J over `values` (0 .. beyond its max) from the same inverted x_T.

    Returns images (V, B, C, H, W) and the re-encoded s_J of each (V, B): does the concept follow?
    """
    res = pipe.edit(x0, [[Edit(prototype, "set", float(v))] for v in values], steps, coupling="alone")  # s_J alone: does it follow?
    return res.images, torch.stack([pipe.encode(img).s[:, prototype] for img in res.images])
