"""Signal no prototype explains: a candidate confounder that separates the target in the data
while no prototype carries it, and where in the image it sits.

Without this, a model whose prototypes never learned the marker (a thin line at random positions,
say) yields an empty shortcut report, which reads as "no shortcut" although the data has one
and the denoiser may still draw it. The check needs no model output beyond the activations:

  1. Is the confounder linked to the target in these images? φ·√N ≥ `z` (a two-sided χ² test
     of independence, z = 3 ≈ p 0.003), and strongly enough to matter: its rate differs by at
     least `min_effect` between the target and the rest (`rate_difference`; the report's flags
     use the same minimum).
  2. Does any prototype carry it? The best prototype's AUROC for the confounder.
  3. Where? Pixel effect size (Cohen's d) of "confounder present − absent" within the target
     class: the map is large where the confounder is drawn, and (with masks) the mask's mean.
  4. Is a prototype looking there? The share of images where a prototype associated with the
     target has that pixel in its receptive-field box; the unexplained map is |d| · (1 − that share).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from patronus.data.shortcuts import phi, rate_difference


def effect_map(images: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(H, W) Cohen's d per pixel (channel mean) of images[a] − images[b] (boolean rows)."""
    if not (a.any() and b.any()):
        return torch.zeros(images.shape[-2:])
    x = images.float().mean(1)  # (N, H, W)
    xa, xb = x[a], x[b]
    pooled = ((xa.var(0, unbiased=False) * len(xa) + xb.var(0, unbiased=False) * len(xb)) / (len(xa) + len(xb))).sqrt()
    return (xa.mean(0) - xb.mean(0)) / pooled.clamp_min(1e-3)


def box_coverage(
    where: torch.Tensor, prototypes: Sequence[int], rows: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], shape: tuple[int, int]
) -> torch.Tensor:
    """(H, W) share of images `rows` where at least one of `prototypes` has the pixel in the box of
    its closest cell (`boxes[cell]` = (top, left, bottom, right))."""
    cover = torch.zeros(*shape)
    if len(rows) == 0 or not prototypes:
        return cover
    for n in rows.tolist():
        hit = torch.zeros(*shape, dtype=torch.bool)
        for j in prototypes:
            top, left, bottom, right = boxes[int(where[n, j])]
            hit[top:bottom, left:right] = True
        cover += hit.float()
    return cover / len(rows)


@dataclass
class Unexplained:
    """A target-linked confounder that no flagged finding carries."""

    target: str
    confounder: str
    phi: float  # correlation of target and confounder in the images
    z: float  # φ·√N
    best_prototype: int
    best_auroc: float  # the best prototype's AUROC for the confounder
    effect: torch.Tensor  # (H, W) Cohen's d, confounder present − absent, within the target class
    unexplained: torch.Tensor  # (H, W) |effect| · (1 − prototype coverage)
    peak: tuple[int, int]  # (row, col) of the unexplained map's maximum
    peak_effect: float  # |d| there
    mask_peak: Optional[tuple[int, int]]  # (row, col) where the ground-truth masks are densest, when known

    def sentence(self) -> str:
        where = f"around pixel (row {self.peak[0]}, col {self.peak[1]})"
        return (
            f"Something no prototype explains separates {self.target}: {self.confounder} goes with it in the data "
            f"(φ = {self.phi:.2f}), no prototype carries it (best: p{self.best_prototype}, AUROC {self.best_auroc:.2f}), "
            f"and the images differ most {where} (effect size {self.peak_effect:.2f}) where no target prototype looks."
        )


CARRIED_AUROC = 0.9  # a prototype at or above this (sign-free) AUROC for a confounder is taken to detect it


def best_detector(confounder_auroc: torch.Tensor, c: int) -> tuple[int, float]:
    """The prototype that detects confounder c best and its AUROC, from sign-free AUROCs (C, K);
    (0, nan) when there are no prototypes."""
    if not confounder_auroc.shape[1]:
        return 0, float("nan")
    best = int(confounder_auroc[c].nan_to_num(0).argmax())
    return best, float(confounder_auroc[c, best])


def unexplained_signals(
    images: torch.Tensor,
    s: torch.Tensor,
    where: torch.Tensor,
    targets: torch.Tensor,
    target_names: Sequence[str],
    confounders: torch.Tensor,
    confounder_names: Sequence[str],
    confounder_auroc: torch.Tensor,
    target_auroc: torch.Tensor,
    carried: set[str],
    boxes: Sequence[tuple[int, int, int, int]],
    masks: Optional[torch.Tensor] = None,
    z: float = 3.0,
    carried_auroc: float = CARRIED_AUROC,
    min_effect: float = 0.1,
) -> list[Unexplained]:
    """Every (target, confounder) pair linked in the data (φ·√N ≥ z, rate difference ≥ min_effect)
    whose confounder is neither in `carried` (the report's findings) nor detected by any prototype
    at AUROC ≥ `carried_auroc`.

    confounder_auroc (C, K) and target_auroc (T, K) are sign-free AUROCs of the prototypes."""
    out = []
    shape = tuple(images.shape[-2:])
    for c, cname in enumerate(confounder_names):
        if cname in carried:
            continue
        best, best_auc = best_detector(confounder_auroc, c)
        if best_auc >= carried_auroc:
            continue
        for t, tname in enumerate(target_names):
            known = ~(targets[:, t].isnan() | confounders[:, c].isnan())
            r = phi(targets[:, t], confounders[:, c])
            score = r * float(known.sum()) ** 0.5 if r == r else 0.0
            if score < z or not rate_difference(targets[:, t], confounders[:, c]) >= min_effect:
                continue  # only a confounder that goes WITH the target, and by enough, can be its shortcut
            pos = known & (targets[:, t] == 1)
            d = effect_map(images, pos & (confounders[:, c] == 1), pos & (confounders[:, c] == 0))
            if not bool((pos & (confounders[:, c] == 0)).any()):  # the confounder is on every target image
                d = effect_map(images, confounders[:, c] == 1, known & (confounders[:, c] == 0))
            looking = [j for j in range(s.shape[1]) if float(target_auroc[t, j]) >= 0.6]
            cover = box_coverage(where, looking, pos.nonzero().flatten()[:200], boxes, shape)
            u = d.abs() * (1 - cover)
            peak = divmod(int(u.argmax()), shape[1])
            mask_peak = None
            if masks is not None and bool(masks.any()):
                m = masks.float().mean((0, 1))
                mask_peak = divmod(int(m.argmax()), shape[1])
            out.append(Unexplained(tname, cname, r, score, best, best_auc, d, u, peak, float(u.max()), mask_peak))
    return sorted(out, key=lambda u: -u.z)


@dataclass
class WeakLink:
    """A confounder linked to a target beyond chance but below the report's minimum effect."""

    target: str
    confounder: str
    rate_target: float  # share of target images with the confounder
    rate_rest: float  # share of the other images with it

    def sentence(self, min_effect: float) -> str:
        return (
            f"{self.confounder} goes with {self.target} in these images, but weakly: it is on {self.rate_target:.0%} "
            f"of them and {self.rate_rest:.0%} of the rest, less than the {100 * min_effect:.0f} percentage points the "
            "report counts as a possible shortcut (min_effect)"
        )


def weak_links(
    targets: torch.Tensor,
    target_names: Sequence[str],
    confounders: torch.Tensor,
    confounder_names: Sequence[str],
    min_effect: float,
    z: float = 3.0,
) -> list[WeakLink]:
    """(target, confounder) pairs where the confounder goes with the target beyond chance (φ·√N ≥ z)
    but its rates differ by less than `min_effect`: what the report leaves out on purpose, so that
    it can say so."""
    out = []
    for c, cname in enumerate(confounder_names):
        for t, tname in enumerate(target_names):
            known = ~(targets[:, t].isnan() | confounders[:, c].isnan())
            r = phi(targets[:, t], confounders[:, c])
            if not (r == r and r * float(known.sum()) ** 0.5 >= z and rate_difference(targets[:, t], confounders[:, c]) < min_effect):
                continue
            pos = known & (targets[:, t] == 1)
            rest = known & (targets[:, t] == 0)
            out.append(WeakLink(tname, cname, float(confounders[pos, c].mean()), float(confounders[rest, c].mean())))
    return out
