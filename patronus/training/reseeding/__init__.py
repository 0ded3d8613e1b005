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
ordinary patches match it. Moving away from the typical patch keeps what makes the cluster unusual;
no labels are used, only the pool's own mean. It helped on X-rays and not on flat backgrounds
(MNIST), so it is off by default (measured: `benchmarks/marker_feature_probe.py`, README).

A place an earlier round seeded is not seeded again: if its pattern is still missed, a prototype
there did not help (measured on X-rays: the rounds kept re-seeding a textured corner of the image
while the marker's corner, the next densest pattern, waited). "Place" means every cell the seeded
cluster was drawn from, not only their mean: a corner texture spread over several cells can have a
mean more than a cell from each of them (measured on X-rays: one corner seeded twice that way, and
the marker's cell not at all).

Modules: `plan` (steps 1–3: where and which prototype, from the model alone), `surgery` (moving
the prototype and resetting what read the old one: tensor operations on the model), `callback`
(`PrototypeReseeding`, the Lightning callback that schedules rounds).
"""

from patronus.training.reseeding.callback import PrototypeReseeding, live_and_averaged
from patronus.training.reseeding.plan import (
    Reseed,
    away_from,
    clean_estimate_error,
    densest_cluster,
    pixel_owner,
    plan_reseed,
    prototype_use,
)
from patronus.training.reseeding.surgery import move_prototype, reset_moments

__all__ = [
    "PrototypeReseeding",
    "Reseed",
    "away_from",
    "clean_estimate_error",
    "densest_cluster",
    "live_and_averaged",
    "move_prototype",
    "pixel_owner",
    "plan_reseed",
    "prototype_use",
    "reset_moments",
]
