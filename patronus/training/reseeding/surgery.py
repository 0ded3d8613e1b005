"""Applying a reseed: tensor operations on a `PatronusModel` and its optimiser state, no Lightning.

When prototype k moves onto a new pattern, everything that still holds the old p_k must let go
of it, or the new prototype starts out read with the old meaning:
  * the prototype (and its place) itself (`move_prototype`, step 1);
  * the condition MLP's BatchNorm running statistics of s_k (step 2);
  * the condition MLP's input column of s_k, set to zero (step 3);
  * the AdamW moments of those parameters (`reset_moments`).
The callback (`patronus.training.reseeding.callback`) applies the first three to the live net and
its EMA copy, the last to every optimiser.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from patronus.models.patronus import PatronusModel
from patronus.torch_utils import eval_mode


@torch.no_grad()
def move_prototype(net: PatronusModel, k: int, feature: torch.Tensor, place: torch.Tensor, pool: torch.Tensor) -> None:
    """Move prototype k of `net` to `feature` at `place` and reset what read the old p_k, measuring
    the new s_k on the images `pool` (B, C, H, W)."""
    with eval_mode(net):  # BatchNorm must not update on the pool
        # 1. p_k := feature (and its place, for position-aware prototypes).
        net.encoder.place_prototype(k, feature, place)
        # 2. The condition's running statistics of s_k: those of the new s_k on the pool, not the old one's.
        s_k = net.encode(pool)[:, k].float()
        norm = net.denoiser.condition_norm
        norm.running_mean[k], norm.running_var[k] = s_k.mean(), s_k.var()
        # 3. The new input starts with zero weights (as ControlNet starts new inputs): the old prototype's
        #    weights would read it with the old meaning, and the noise that injects makes "flatten s_k",
        #    i.e. push the prototype off the pattern, the fastest way down the loss.
        net.denoiser.condition_input.weight[:, k] = 0


def moved_entries(net: PatronusModel, k: int) -> list[tuple[torch.nn.Parameter, tuple[Any, ...]]]:
    """(parameter, index) of every entry `move_prototype` rewrites for prototype k."""
    enc = net.encoder
    moved = [(enc.prototypes, (k,)), (net.denoiser.condition_input.weight, (slice(None), k))]
    if enc.position_weight > 0:
        moved.append((enc.prototype_positions, (k,)))
    return moved


@torch.no_grad()
def reset_moments(optimizers: Iterable[torch.optim.Optimizer], net: PatronusModel, k: int) -> None:
    """Zero the Adam(W) moments of prototype k's rewritten entries: the old prototype's moments would
    drag the new one back."""
    for opt in optimizers:
        for param, index in moved_entries(net, k):
            state = opt.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][index] = 0
