"""Where to reseed: one round's decision (steps 1–3 of `patronus.training.reseeding`), read from the model alone.

`plan_reseed` scores the pool's feature cells by the denoiser's x̂0 error, clusters the worst
cells under the prototypes' own distance, skips patterns a prototype already matches and places
already seeded, and picks the prototype the denoiser uses least. No Lightning here: a plan is a
`Reseed` of tensors, applied by `patronus.training.reseeding.surgery`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from patronus.diffusion import clean_estimate
from patronus.models.patronus import PatronusModel
from patronus.models.prototypes import ReceptiveField


def pixel_owner(rf: ReceptiveField, grid: tuple[int, int]) -> torch.Tensor:
    """(S*S,) the feature cell whose receptive-field centre is nearest each pixel (flat indices)."""
    h, w = grid
    pix = torch.arange(rf.image_size, dtype=torch.float32) + 0.5
    rows = (pix[:, None] - (rf.start + rf.jump * torch.arange(h))[None]).abs().argmin(1)  # (S,)
    cols = (pix[:, None] - (rf.start + rf.jump * torch.arange(w))[None]).abs().argmin(1)
    return (rows[:, None] * w + cols[None, :]).flatten()


def _noised(
    scheduler: DDPMScheduler, x0: torch.Tensor, t: int, generator: Optional[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, ε, timesteps) for every image of x0 at the one timestep t; ε drawn on the CPU so a seed means the same anywhere."""
    noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0)
    tt = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
    return scheduler.add_noise(x0, noise, tt), noise, tt


@torch.no_grad()
def clean_estimate_error(
    net: PatronusModel, scheduler: DDPMScheduler, x0: torch.Tensor, t: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """(B, S, S) squared error of x̂0 = (x_t − √(1−ᾱ_t) ε̂(x_t, t, s)) / √ᾱ_t against x0, summed over channels:
    what the denoiser, told s = g(x0), still gets wrong once the noise hides the image."""
    x_t, _, tt = _noised(scheduler, x0, t, generator)
    x0_hat = clean_estimate(scheduler, x_t, tt, net(x_t, tt, s=net.encode(x0)))
    return (x0_hat - x0.float()).pow(2).sum(1)


def densest_cluster(
    distances: torch.Tensor, radius_share: float, available: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, int, float]:
    """(members of the densest point's neighbourhood (N,) bool, the densest point, squared radius) among
    points with pairwise squared distances (N, N): the radius is `radius_share` × their median.
    Only `available` points (N,) bool (default: all) count, as centres and as members."""
    radius = float(radius_share * distances.median())
    near = distances < radius
    if available is not None:
        near = near & available[None] & available[:, None]
    i = int(near.sum(1).argmax())
    return near[i], i, radius


def away_from(places: torch.Tensor, seeded: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N,) bool: places (N, 2) farther than one cell step from every seeded place (M, 2), all in [0, 1]²."""
    if len(seeded) == 0:
        return torch.ones(len(places), dtype=torch.bool, device=places.device)
    step = 1.0 / max(max(grid) - 1, 1)
    return torch.cdist(places.float(), seeded.to(places).float()).min(1).values > step * (1 + 1e-4)


def prototype_use(
    net: PatronusModel, scheduler: DDPMScheduler, x0: torch.Tensor, t: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """(K,) first-order estimate of how much the denoising loss would rise if each prototype were held
    at its batch mean: mean_b |∂L/∂s_bk · (s_bk − s̄_k)|. Small = the denoiser barely reads it."""
    with torch.no_grad():
        s = net.encode(x0)
        x_t, noise, tt = _noised(scheduler, x0, t, generator)
    s = s.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.mse_loss(net(x_t, tt, s=s).float(), noise.float(), reduction="sum")
        (grad,) = torch.autograd.grad(loss, s)
    return (grad * (s - s.mean(0))).abs().mean(0).detach()


@dataclass
class Reseed:
    """One round's decision: prototype `index` moves to `feature` at `place`, the centroid of a pattern
    `support` of the worst cells share, drawn from the cells at `member_places` (M, 2);
    `image`, `cell`: the cluster's densest cell, for the log."""

    index: int
    feature: torch.Tensor
    place: torch.Tensor
    support: int
    image: int
    cell: int
    member_places: torch.Tensor


def plan_reseed(
    net: PatronusModel,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    t: int,
    candidates: int,
    radius_share: float,
    min_support: int,
    protected: set[int],  # prototypes an earlier round moved; empty = every prototype may move
    use_images: int = 64,
    generator: Optional[torch.Generator] = None,
    seeded_places: Optional[torch.Tensor] = None,  # None = no place has been seeded yet
    contrast: float = 0.0,  # 0 = seed the centroid c itself
) -> tuple[Optional[Reseed], str]:
    """The reseeding of one round on the pool `x0`, or None with the reason (steps 1–3 of
    `patronus.training.reseeding`). Prototype use is estimated on the last `use_images` of the pool
    (it needs a backward pass); cells within one step of `seeded_places` (M, 2) (earlier rounds'
    places) are not candidates; the seed is the centroid moved `contrast` times its offset from the
    pool's mean feature, c + α·(c − μ)."""
    enc = net.encoder
    # 1. Per feature cell, the x̂0 error in the pixels it owns at the one timestep t; keep the worst cells.
    err = clean_estimate_error(net, scheduler, x0, t, generator)  # (B, S, S)
    grid = enc.feature_shape()
    owner = pixel_owner(enc.receptive_field(), grid).to(err.device)
    cells = grid[0] * grid[1]
    cell_err = torch.zeros(err.shape[0], cells, device=err.device).index_add_(1, owner, err.flatten(1))  # (B, H'·W')
    grid_places = enc.cell_positions(*grid).to(cell_err)
    if seeded_places is not None:  # a place is seeded once: its cells leave the ranking
        cell_err = cell_err * away_from(grid_places, seeded_places, grid)[None]
    worst = cell_err.flatten().topk(min(candidates, cell_err.numel())).indices
    with torch.no_grad():
        z = enc.features(x0).float().flatten(2).transpose(1, 2).reshape(-1, enc.prototypes.shape[1])  # (B·H'·W', D)
    feats, places = z[worst], grid_places[worst % cells]
    # 2. The densest cluster of the worst cells under the prototypes' own distance (feature and, if
    #    position-aware, place): the cluster is then what one prototype can match, not every cell that
    #    looks alike anywhere in the image.
    pairs = enc.patch_pair_distances(feats, places)
    available, served = torch.ones(len(worst), dtype=torch.bool, device=pairs.device), 0
    while True:  # the densest pattern no prototype matches yet
        members, i, radius = densest_cluster(pairs, radius_share, available)
        support = int(members.sum())
        if support < min_support:
            return None, (
                f"no recurring pattern among the {len(worst)} worst cells without a prototype (largest cluster "
                f"{support} < {min_support}; {served} recurring pattern(s) already have one)"
            )
        # The centroid, not one image's cell: ProtoPNet projects onto one patch for interpretability, but a
        # single marked cell also carries its image's strokes; the cluster's mean keeps what recurs.
        feature, place = feats[members].mean(0), places[members].mean(0)
        if float(enc.patch_distances(feature, place).min()) >= 2 * radius:  # no prototype within twice its radius
            break
        available, served = available & ~members, served + 1
    image, cell = divmod(int(worst[i]), cells)
    if contrast:  # c + α·(c − μ), μ the mean feature of every cell of the pool
        feature = feature + contrast * (feature - z.mean(0))
    # 3. The prototype the denoiser uses least (not one an earlier round moved) takes the seed.
    use = prototype_use(net, scheduler, x0[-use_images:], t, generator)
    free = [k for k in range(len(use)) if k not in protected]
    if not free:
        return None, "every prototype has been reseeded once already"
    k = min(free, key=lambda j: float(use[j]))
    return Reseed(k, feature, place, support, image, cell, places[members].unique(dim=0)), ""
