"""Consistency, quantified: does prototype J, edited into N different images, appear as the same
thing in the same position? (Patronus shows this only as a grid of examples.)

Per prototype, over the images where raising s_J actually raised it:
- location spread: mean pixel distance of J's argmin-cell centres from their centroid;
- feature spread: mean distance of the patch features at those cells from their centroid,
  divided by the same spread for the cells that *any* prototype picks in the same images
  (chance level: salient patches in general; plain background cells would make chance too easy);
- consistency = 1 − feature spread ratio (1: identical patches, 0: no more alike than any
  prototype's picks; negative: less alike).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from einops import rearrange

from patronus.interpret.localise import EditOutcome
from patronus.pipeline import PatronusPipeline


@dataclass
class Consistency:
    prototype: int
    images: int  # images where the edit raised s_J (the ones scored)
    location_spread_px: float
    feature_spread: float
    chance_feature_spread: float
    consistency: float

    def as_dict(self) -> dict:
        return asdict(self)


def centroid_spread(x: torch.Tensor) -> float:
    """Mean Euclidean distance of rows (n, D) from their mean."""
    return float((x - x.mean(0)).norm(dim=1).mean()) if len(x) else float("nan")


def prototype_consistency(pipe: PatronusPipeline, outcome: EditOutcome) -> list[Consistency]:
    """One score per edited prototype from an `edit_each_prototype` outcome."""
    with pipe.inference():
        return _consistency(pipe, outcome)


def _consistency(pipe: PatronusPipeline, outcome: EditOutcome) -> list[Consistency]:
    enc = pipe.model.encoder
    rf = enc.receptive_field()
    _, w = enc.feature_shape()
    scores = []
    for i, j in enumerate(outcome.prototypes):
        keep = outcome.rise[i] > 0
        n = int(keep.sum())
        if n < 2:
            scores.append(Consistency(j, n, float("nan"), float("nan"), float("nan"), float("nan")))
            continue
        cells = outcome.cells[i, keep]  # (n, 2)
        centres = rf.start + cells.double() * rf.jump  # pixel coordinates
        edited = outcome.edited[i, keep].to(pipe.device)
        z = rearrange(enc.features(edited), "n d h w -> n (h w) d")
        where = pipe.encode(edited).where  # (n, K) every prototype's argmin cell
        at_cell = z[torch.arange(n), (cells[:, 0] * w + cells[:, 1])]  # (n, D)
        any_pick = z[torch.arange(n)[:, None], where]  # (n, K, D)
        spread, chance = centroid_spread(at_cell.double()), centroid_spread(any_pick.flatten(0, 1).double())
        scores.append(Consistency(j, n, centroid_spread(centres), spread, chance, 1 - spread / max(chance, 1e-12)))
    return scores
