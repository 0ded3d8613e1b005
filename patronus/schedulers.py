"""The schedulers a denoising loop runs: per-call DDIM / DDPM / inverse-DDIM variants of ONE registered scheduler.

`PatronusPipeline` registers one scheduler (its own default, or one a user passes in); every verb
derives a fresh scheduler of the kind it needs from that scheduler's config, so every setting a
user chose (spacing, offset, clipping, ...) is kept, and the registered scheduler's state is never
touched by a call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

Kind = Literal["ddim", "ddpm", "inverse"]
KINDS: dict[str, type[SchedulerMixin]] = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "inverse": DDIMInverseScheduler}


def default_ddim(config: Mapping[str, Any]) -> DDIMScheduler:
    """The DDIM scheduler of a training schedule (`PatronusModel.noise_scheduler().config`) that a
    pipeline registers when it is given none: trailing spacing and ᾱ_final = 1, so decoding starts
    at t = T−1, ends on the clean image, and the inverse visits exactly the timesteps decoding uses."""
    return DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True)


def scheduler_for(config: Mapping[str, Any], kind: Kind, steps: int, clip: bool = True) -> SchedulerMixin:
    """A fresh scheduler of `kind` with `steps` steps, built from a registered scheduler's `config`
    with every setting kept. `clip=False` turns x̂0 clipping off (exact inversion and reconstruction);
    `clip=True` keeps the config's own `clip_sample`."""
    if steps < 1:
        raise ValueError(f"steps={steps}; expected at least 1 denoising step")
    if kind not in KINDS:
        raise ValueError(f"scheduler kind {kind!r}; expected one of {sorted(KINDS)}")
    sched = KINDS[kind].from_config(config, **({} if clip else {"clip_sample": False}))
    sched.set_timesteps(steps)
    return sched
