"""The Lightning callback that schedules reseeding rounds: it keeps the pool, plans, and applies.

The decision is `patronus.training.reseeding.plan`, the change to the model
`patronus.training.reseeding.surgery`; this module only knows the Trainer: when a round runs,
which nets and optimisers it writes, what a resumed run remembers, and what DDP ranks share.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from patronus.models.patronus import PatronusModel
from patronus.torch_utils import eval_mode
from patronus.training.callbacks import averaged_net
from patronus.training.reseeding.plan import Reseed, plan_reseed
from patronus.training.reseeding.surgery import move_prototype, reset_moments


def live_and_averaged(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[PatronusModel]:
    """The live net and, when an EMA callback holds one, its averaged copy: a round writes both, or the EMA
    copy would blend the old prototype into the new for hundreds of steps."""
    ema = averaged_net(trainer, pl_module)
    return [pl_module.net] if ema is pl_module.net else [pl_module.net, ema]


class PrototypeReseeding(pl.Callback):
    """Every `every_n_steps` from `start_step` until `stop_fraction` of trainer.max_steps, move the least
    used prototype onto the pattern the denoiser most often fails to draw (`patronus.training.reseeding`).

    Each prototype is reseeded at most once, each place seeded once. The prototype's optimiser moments,
    the condition's running statistics, its input weights and the EMA copy follow, so the new prototype
    starts clean everywhere (`patronus.training.reseeding.surgery`). Reseeded prototypes are left out of
    L_distinct: real patch features all sit in the sigmoid's positive orthant (|cos| near 1 to some
    other prototype), so its margin would push the prototype off the pattern soon after the round
    (measured); the seeding itself checked it is far, in L2, from every other prototype.
    Under DDP rank 0 decides and every rank applies.
    """

    def __init__(
        self,
        every_n_steps: int = 100,  # steps between rounds
        start_step: int = 600,  # the first round's step
        stop_fraction: float = 0.8,  # no round after this share of the training steps; 1 = rounds until the end
        pool_batches: int = 4,  # the last training batches a round looks at
        timestep_fraction: float = 0.7,  # t = fraction · T, high noise: the image is hidden, only s helps
        candidates: int = 128,  # the worst cells clustered
        radius_share: float = 0.05,  # cluster radius, × the median pairwise distance of the candidates
        min_support: int = 4,  # fewer cells in the densest cluster = no recurring pattern, the round is skipped
        seed: int = 0,  # noise of a round at step n: seed + n
        contrast: float = 0.0,  # α of the seed c + α·(c − μ); 0 = the cluster's centroid c itself
    ):
        if not contrast >= 0:
            raise ValueError(f"reseed: contrast={contrast!r}; expected a number >= 0")
        if every_n_steps < 1 or start_step < 0 or pool_batches < 1 or candidates < 2 or min_support < 2:
            raise ValueError("reseed: every_n_steps, pool_batches ≥ 1, start_step ≥ 0, candidates, min_support ≥ 2")
        if not 0.0 < timestep_fraction < 1.0 or not 0.0 < stop_fraction <= 1.0 or not 0.0 < radius_share < 1.0:
            raise ValueError(
                f"reseed: timestep_fraction={timestep_fraction}, radius_share={radius_share} must lie in (0, 1) "
                f"and stop_fraction={stop_fraction} in (0, 1]"
            )
        self.every, self.start, self.stop = every_n_steps, start_step, stop_fraction
        self.pool_batches, self.t_fraction = pool_batches, timestep_fraction
        self.candidates, self.radius_share, self.min_support, self.seed = candidates, radius_share, min_support, seed
        self.contrast = contrast
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
            rank_zero_warn(
                f"reseed: start_step={self.start} is past stop_fraction={self.stop} × {total} "
                f"training steps = {self.stop * total:.0f}: no prototype will be reseeded in this run"
            )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.pool = (self.pool + [batch["image"].detach()])[-self.pool_batches :]
        step = trainer.global_step
        if step < self.start or (step - self.start) % self.every or step > self.stop * trainer.estimated_stepping_batches:
            return
        self._round(trainer, pl_module, step)

    def _round(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        net: PatronusModel = pl_module.net
        pool = torch.cat(self.pool)
        generator = torch.Generator().manual_seed(self.seed + step)
        # 1. Rank 0's plan (steps 1–3 of `patronus.training.reseeding`) goes to every rank.
        with eval_mode(net):  # BatchNorm must not update on the pool
            t = int(self.t_fraction * net.config.num_train_timesteps)
            plan, why = plan_reseed(
                net,
                pl_module.scheduler,
                pool,
                t,
                self.candidates,
                self.radius_share,
                self.min_support,
                set(self.reseeded),
                len(self.pool[-1]),
                generator,
                torch.tensor(self.places).reshape(-1, 2),
                self.contrast,
            )
        plan = trainer.strategy.broadcast(plan, src=0)
        if plan is None:
            rank_zero_info(f"step {step}: reseeding skipped: {why}")
            return
        # 2. Apply it; remember the prototype and every place it was drawn from.
        self._apply(trainer, pl_module, plan, pool)
        self.reseeded[plan.index] = step
        self.places.extend(torch.cat([plan.place[None], plan.member_places]).tolist())  # (row, col) floats
        rank_zero_info(
            f"step {step}: prototype {plan.index} reseeded on a pattern the denoiser misses in {plan.support} of the "
            f"{self.candidates} worst cells (pool image {plan.image}, cell {plan.cell})"
        )

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, plan: Reseed, pool: torch.Tensor) -> None:
        """Move the prototype in the live net and its EMA copy, keep it out of L_distinct, and clear its AdamW moments."""
        k = plan.index
        for net in live_and_averaged(trainer, pl_module):
            move_prototype(net, k, plan.feature, plan.place, pool)
        pl_module.distinct_exempt = sorted({*self.reseeded, k})
        reset_moments(trainer.optimizers, pl_module.net, k)
