"""Prototype reseeding: give a prototype to what the generator keeps failing to draw.

The denoiser only learns what `s` tells it. A small pattern that recurs on part of the data (a
marker, a pacemaker lead, a watermark) costs few pixels of loss, so gradient descent alone rarely
moves a prototype there: prototypes follow the mass of common patches, and the pattern stays out
of `s`, the report and the steering. But it leaves a trace that needs no labels: at high noise,
where x_t no longer shows it, the denoiser's clean-image estimate x̂0(x_t, t, s) misses it, and it
misses it the same way on many images. So, a few times early in training:

1. score every feature cell of a pool of recent training images by the denoiser's x̂0 error in
   the pixels it owns, at one high-noise timestep;
2. among the worst cells, find the densest cluster under the prototypes' own distance (encoder
   feature and, for position-aware prototypes, place): the error recurs as one pattern in one place
   rather than as scattered stroke details;
3. if a prototype is already near it, go on to the next densest cluster; then move the prototype the
   denoiser uses least (first-order estimate of the loss change if it were held at its mean) onto
   the cluster's centroid (feature and place), and let training refine it.

With `contrast` α > 0 the seed is not the centroid c itself but c + α·(c − μ), μ the mean feature of
every cell of the pool: the centroid also holds what every patch shares (the texture around a
1-px line fills most of a 15-px receptive field), and under the L2 distance that shared part lets
ordinary patches match it. Moving away from the typical patch keeps what makes the cluster unusual.
Measured (`benchmarks/marker_feature_probe.py`: the marked cells' centroid on a trained X-ray
encoder, 1-px line at 90%, 524 held-out X-rays with the marker at p = q = 0.5): marker AUROC 0.90
at α = 0, 0.97 at α = 1; no labels are used, only the pool's own mean. On flat backgrounds (MNIST)
it does not help, so it is off by default.

A place an earlier round seeded is not seeded again: if its pattern is still missed, a prototype
there did not help (measured on X-rays: the rounds kept re-seeding a textured corner of the image
while the marker's corner, the next densest pattern, waited). "Place" means every cell the seeded
cluster was drawn from, not only their mean: a corner texture spread over several cells can have a
mean more than a cell from each of them (measured on X-rays: one corner seeded twice that way, and
the marker's cell not at all).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from patronus.diffusion import clean_estimate, diffusion_loss
from patronus.models.patronus import PatronusModel
from patronus.models.prototypes import ReceptiveField
from patronus.training.callbacks import averaged_net


@contextmanager
def evaluating(net: torch.nn.Module) -> Iterator[None]:
    """Eval mode for a round's own passes (BatchNorm must not update on the pool); the train flag is restored."""
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


def live_and_averaged(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[PatronusModel]:
    """The live net and, when an EMA callback holds one, its averaged copy: a round writes both, or the EMA
    copy would blend the old prototype into the new for hundreds of steps."""
    ema = averaged_net(trainer, pl_module)
    return [pl_module.net] if ema is pl_module.net else [pl_module.net, ema]


def pixel_owner(rf: ReceptiveField, grid: tuple[int, int]) -> torch.Tensor:
    """(S*S,) the feature cell whose receptive-field centre is nearest each pixel (flat indices)."""
    h, w = grid
    pix = torch.arange(rf.image_size, dtype=torch.float32) + 0.5
    rows = (pix[:, None] - (rf.start + rf.jump * torch.arange(h))[None]).abs().argmin(1)  # (S,)
    cols = (pix[:, None] - (rf.start + rf.jump * torch.arange(w))[None]).abs().argmin(1)
    return (rows[:, None] * w + cols[None, :]).flatten()


def _noised(scheduler: DDPMScheduler, x0: torch.Tensor, t: int,
            generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, ε, timesteps) for every image of x0 at the one timestep t; ε drawn on the CPU so a seed means the same anywhere."""
    noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0)
    tt = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
    return scheduler.add_noise(x0, noise, tt), noise, tt


@torch.no_grad()
def clean_estimate_error(net: PatronusModel, scheduler: DDPMScheduler, x0: torch.Tensor, t: int,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, S, S) squared error of x̂0 = (x_t − √(1−ᾱ_t) ε̂(x_t, t, s)) / √ᾱ_t against x0, summed over channels:
    what the denoiser, told s = g(x0), still gets wrong once the noise hides the image."""
    x_t, _, tt = _noised(scheduler, x0, t, generator)
    x0_hat = clean_estimate(scheduler, x_t, tt, net(x_t, tt, s=net.encode(x0)))
    return (x0_hat - x0.float()).pow(2).sum(1)


def densest_cluster(distances: torch.Tensor, radius_share: float,
                    available: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, int, float]:
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


def prototype_use(net: PatronusModel, scheduler: DDPMScheduler, x0: torch.Tensor, t: int,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
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


def fit_condition_column(net: PatronusModel, scheduler: DDPMScheduler, x0: torch.Tensor, k: int, steps: int, lr: float,
                         batch_size: int, snr_gamma: Optional[float] = None,
                         generator: Optional[torch.Generator] = None) -> float:
    """Fit only the condition MLP's input column of prototype k to the denoising loss on `x0`, everything
    else frozen (the prototype included, so "flatten s_k" is no way down); returns the column's norm.

    Why: a reseeded column starts at zero and then competes, late in a decaying schedule, with prototypes
    that co-occur with the new pattern (a marker on most pneumonia X-rays is already painted from the
    pneumonia prototypes); measured on X-rays it ended at a quarter of the median column norm, and edits of
    the prototype barely drew the pattern. Fitting the new input alone first is linear probing before
    fine-tuning (Kumar et al. 2022): the new input starts out explaining what it was seeded on.
    """
    weight = net.denoiser.cond_mlp[1].weight
    keep = torch.zeros_like(weight, dtype=torch.bool)
    keep[:, k] = True
    with torch.no_grad():
        s = net.encode(x0)
    trainable = {p: p.requires_grad for p in net.parameters()}
    for param in trainable:
        param.requires_grad_(param is weight)
    opt = torch.optim.Adam([weight], lr=lr)  # zero gradients elsewhere: Adam then leaves those entries as they are
    try:
        with torch.enable_grad():
            for _ in range(steps):
                rows = torch.randperm(len(x0), generator=generator)[:batch_size].to(x0.device)
                loss, _ = diffusion_loss(net, scheduler, x0[rows], snr_gamma, s=s[rows])
                opt.zero_grad(set_to_none=False)
                loss.backward()
                weight.grad.masked_fill_(~keep, 0)
                opt.step()
    finally:
        for param, flag in trainable.items():
            param.requires_grad_(flag)
        weight.grad = None
    return float(weight[:, k].detach().norm())


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


def plan_reseed(net: PatronusModel, scheduler: DDPMScheduler, x0: torch.Tensor, t: int, candidates: int,
                radius_share: float, min_support: int, protected: set[int], use_images: int = 64,
                generator: Optional[torch.Generator] = None,
                seeded_places: Optional[torch.Tensor] = None, contrast: float = 0.0) -> tuple[Optional[Reseed], str]:
    """The reseeding of one round on the pool `x0`, or None with the reason (steps 1–3 of the module docstring).
    Prototype use is estimated on the last `use_images` of the pool (it needs a backward pass); cells
    within one step of `seeded_places` (M, 2) (earlier rounds' places) are not candidates; the seed is
    the centroid moved `contrast` times its offset from the pool's mean feature (module docstring)."""
    enc = net.encoder
    err = clean_estimate_error(net, scheduler, x0, t, generator)  # (B, S, S)
    grid = enc.feature_shape()
    owner = pixel_owner(enc.receptive_field(), grid).to(err.device)
    cells = grid[0] * grid[1]
    cell_err = torch.zeros(err.shape[0], cells, device=err.device).index_add_(1, owner, err.flatten(1))  # (B, C)
    grid_places = enc.cell_positions(*grid).to(cell_err)
    if seeded_places is not None:  # a place is seeded once: its cells leave the ranking
        cell_err = cell_err * away_from(grid_places, seeded_places, grid)[None]
    worst = cell_err.flatten().topk(min(candidates, cell_err.numel())).indices
    with torch.no_grad():
        z = enc.features(x0).float().flatten(2).transpose(1, 2).reshape(-1, enc.prototypes.shape[1])  # (B*C, D)
    feats, places = z[worst], grid_places[worst % cells]
    # Cluster with the prototypes' own distance (feature and, if position-aware, place): the cluster is
    # then what one prototype can match, not every cell that looks alike anywhere in the image.
    pairs = enc.patch_pair_distances(feats, places)
    available, served = torch.ones(len(worst), dtype=torch.bool, device=pairs.device), 0
    while True:  # the densest pattern no prototype matches yet
        members, i, radius = densest_cluster(pairs, radius_share, available)
        support = int(members.sum())
        if support < min_support:
            return None, (f"no recurring pattern among the {len(worst)} worst cells without a prototype (largest cluster "
                          f"{support} < {min_support}; {served} recurring pattern(s) already have one)")
        # The centroid, not one image's cell: ProtoPNet projects onto one patch for interpretability, but a
        # single marked cell also carries its image's strokes; the cluster's mean keeps what recurs.
        feature, place = feats[members].mean(0), places[members].mean(0)
        if float(enc.patch_distances(feature, place).min()) >= 2 * radius:  # no prototype within twice its radius
            break
        available, served = available & ~members, served + 1
    image, cell = divmod(int(worst[i]), cells)
    if contrast:
        feature = feature + contrast * (feature - z.mean(0))
    use = prototype_use(net, scheduler, x0[-use_images:], t, generator)
    free = [k for k in range(len(use)) if k not in protected]
    if not free:
        return None, "every prototype has been reseeded once already"
    k = min(free, key=lambda j: float(use[j]))
    return Reseed(k, feature, place, support, image, cell, places[members].unique(dim=0)), ""


class PrototypeReseeding(pl.Callback):
    """Every `every_n_steps` from `start_step` until `stop_fraction` of trainer.max_steps, move the least
    used prototype onto the pattern the denoiser most often fails to draw (see the module docstring).

    Each prototype is reseeded at most once, each place seeded once. The pool is the last `pool_batches` training batches;
    `timestep_fraction` picks t = fraction · T (high noise: the image itself is hidden, only s helps).
    The prototype's optimiser moments, the condition's running statistics, its input weights and the
    EMA copy follow, so the new prototype starts clean everywhere. Reseeded prototypes are left out of
    L_distinct: real patch features all sit in the sigmoid's positive orthant (|cos| ≈ 0.95 to some
    other prototype), so its margin would push the prototype off the pattern within ~100 steps
    (measured); the seeding itself checked it is far, in L2, from every other prototype.
    `column_fit_steps` > 0 then fits the new prototype's condition input alone for that many Adam steps
    at `column_fit_lr` on the pool (`fit_condition_column`), so the denoiser reads it from the start.
    `contrast` α > 0 seeds c + α·(c − μ) instead of the centroid c (module docstring).
    Under DDP rank 0 decides and every rank applies.
    """

    def __init__(self, every_n_steps: int = 100, start_step: int = 600, stop_fraction: float = 0.8,
                 pool_batches: int = 4, timestep_fraction: float = 0.7, candidates: int = 128,
                 radius_share: float = 0.05, min_support: int = 4, seed: int = 0, column_fit_steps: int = 0,
                 column_fit_lr: float = 1e-2, contrast: float = 0.0):
        if not contrast >= 0:
            raise ValueError(f"reseed: contrast={contrast!r}; expected a number >= 0")
        if column_fit_steps < 0 or not column_fit_lr > 0:
            raise ValueError(f"reseed: column_fit_steps={column_fit_steps} must be ≥ 0 and column_fit_lr={column_fit_lr} > 0")
        if every_n_steps < 1 or start_step < 0 or pool_batches < 1 or candidates < 2 or min_support < 2:
            raise ValueError("reseed: every_n_steps, pool_batches ≥ 1, start_step ≥ 0, candidates, min_support ≥ 2")
        if not 0.0 < timestep_fraction < 1.0 or not 0.0 < stop_fraction <= 1.0 or not 0.0 < radius_share < 1.0:
            raise ValueError(f"reseed: timestep_fraction={timestep_fraction}, radius_share={radius_share} must lie in (0, 1) "
                             f"and stop_fraction={stop_fraction} in (0, 1]")
        self.every, self.start, self.stop = every_n_steps, start_step, stop_fraction
        self.pool_batches, self.t_fraction = pool_batches, timestep_fraction
        self.candidates, self.radius_share, self.min_support, self.seed = candidates, radius_share, min_support, seed
        self.column_fit_steps, self.column_fit_lr, self.contrast = column_fit_steps, column_fit_lr, contrast
        self.pool: list[torch.Tensor] = []
        self.reseeded: dict[int, int] = {}  # prototype -> step
        self.places: list[list[float]] = []  # (row, col) in [0, 1]² of every seeded pattern and its cells: each is seeded once

    def state_dict(self) -> dict[str, Any]:
        return {"reseeded": {str(k): v for k, v in self.reseeded.items()}, "places": self.places}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reseeded = {int(k): int(v) for k, v in state_dict.get("reseeded", {}).items()}
        self.places = [[float(r), float(c)] for r, c in state_dict.get("places", [])]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.distinct_exempt = sorted(self.reseeded)  # a resumed run keeps them out of L_distinct too
        total = trainer.estimated_stepping_batches  # max_steps, or what the epochs allow (as the lr schedule counts)
        if self.start > self.stop * total:  # e.g. a preset's start_step kept while --trainer.max_steps was shortened
            rank_zero_warn(f"reseed: start_step={self.start} is past stop_fraction={self.stop} × {total} "
                           f"training steps = {self.stop * total:.0f}: no prototype will be reseeded in this run")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.pool = (self.pool + [batch["image"].detach()])[-self.pool_batches:]
        step = trainer.global_step
        if step < self.start or (step - self.start) % self.every or step > self.stop * trainer.estimated_stepping_batches:
            return
        self._round(trainer, pl_module, step)

    def _round(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        net: PatronusModel = pl_module.net
        pool = torch.cat(self.pool)
        generator = torch.Generator().manual_seed(self.seed + step)
        with evaluating(net):
            t = int(self.t_fraction * net.config.num_train_timesteps)
            plan, why = plan_reseed(net, pl_module.scheduler, pool, t, self.candidates, self.radius_share,
                                    self.min_support, set(self.reseeded), len(self.pool[-1]), generator,
                                    torch.tensor(self.places).reshape(-1, 2), self.contrast)
        plan = trainer.strategy.broadcast(plan, src=0)
        if plan is None:
            rank_zero_info(f"step {step}: reseeding skipped: {why}")
            return
        self._apply(trainer, pl_module, plan, pool)
        if self.column_fit_steps:
            self._fit_column(trainer, pl_module, plan.index, pool, generator)
        self.reseeded[plan.index] = step
        self.places.extend(torch.cat([plan.place[None], plan.member_places]).tolist())  # (row, col) floats
        rank_zero_info(f"step {step}: prototype {plan.index} reseeded on a pattern the denoiser misses in {plan.support} of the "
                       f"{self.candidates} worst cells (pool image {plan.image}, cell {plan.cell})")

    def _fit_column(self, trainer: pl.Trainer, pl_module: pl.LightningModule, k: int, pool: torch.Tensor,
                    generator: torch.Generator) -> None:
        """Fit the new input column alone (`fit_condition_column`); rank 0's column goes to every rank and the EMA copy."""
        net = pl_module.net
        with evaluating(net):
            norm = fit_condition_column(net, pl_module.scheduler, pool, k, self.column_fit_steps, self.column_fit_lr,
                                        len(self.pool[-1]), pl_module.hparams.snr_gamma, generator)
        column = trainer.strategy.broadcast(net.denoiser.cond_mlp[1].weight[:, k].detach().clone(), src=0)
        with torch.no_grad():
            for copy in live_and_averaged(trainer, pl_module):
                copy.denoiser.cond_mlp[1].weight[:, k] = column.to(copy.denoiser.cond_mlp[1].weight)
        rank_zero_info(f"prototype {k}: its condition input fitted alone for {self.column_fit_steps} steps "
                       f"(column norm {norm:.2f})")

    @torch.no_grad()
    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, plan: Reseed, pool: torch.Tensor) -> None:
        k = plan.index
        for net in live_and_averaged(trainer, pl_module):
            with evaluating(net):
                net.encoder.place_prototype(k, plan.feature, plan.place)
                s_k = net.encode(pool)[:, k].float()
                norm = net.denoiser.cond_mlp[0]
                norm.running_mean[k], norm.running_var[k] = s_k.mean(), s_k.var()  # running statistics of the old s_k
                # The new input starts with zero weights (as ControlNet starts new inputs): the old prototype's
                # weights would read it with the old meaning, and the noise that injects makes "flatten s_k",
                # i.e. push the prototype off the pattern, the fastest way down the loss.
                net.denoiser.cond_mlp[1].weight[:, k] = 0
        pl_module.distinct_exempt = sorted({*self.reseeded, k})
        enc, live = pl_module.net.encoder, pl_module.net.denoiser.cond_mlp[1].weight
        moved = [(enc.prototypes, (k,)), (live, (slice(None), k))]
        if enc.position_weight > 0:
            moved.append((enc.prototype_positions, (k,)))
        for opt in trainer.optimizers:  # AdamW moments of the old prototype would drag the new one back
            for param, index in moved:
                state = opt.state.get(param, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key][index] = 0
