"""The marker rule: is a planted marker in an image? A pixel rule calibrated on real images only.

On data with a planted marker and its masks (`patronus.data.shortcuts`), `marker_detector` fits:
  * fixed marker position (every marked image's mask is the same): score = mean intensity
    inside that mask;
  * random position: score = the maximum over every marker-sized window (the masks' bounding
    box) of the window's mean intensity;
threshold = midpoint between the mean score of the real unmarked and of the real marked images;
an image has the marker when its score is on the marked side of the threshold (intensities are
taken with the marker's polarity, so a dark marker works the same way). `marker_rates` scores
decoded images with it (the judgement half of `patronus.interpret.marker_effect`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class MarkerDetector:
    """The "is the marker there" pixel rule, calibrated on real images (see the module docstring)."""

    rule: str  # "mask" (fixed position) or "window" (random position)
    mask: Optional[torch.Tensor]  # (1, H, W) the fixed marker mask ("mask" rule)
    window: tuple[int, int]  # marker height, width ("window" rule)
    polarity: float  # +1: the marker is brighter than what it covers, −1: darker
    unmarked_score: float  # mean score of the real unmarked images
    marked_score: float  # mean score of the real marked images
    threshold: float  # their midpoint
    real_accuracy: float  # share of the real calibration images the rule gets right

    def score(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) marker score of images (N, C, H, W), in the marker's polarity."""
        x = self.polarity * images.float().cpu().mean(1, keepdim=True)  # (N, 1, H, W)
        if self.rule == "mask":
            m = self.mask.float()
            return (x * m).flatten(1).sum(1) / m.sum()
        return F.avg_pool2d(x, self.window, stride=1).flatten(1).amax(1)

    def present(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) bool: is the score on the marked side of the threshold."""
        return self.score(images) > self.threshold


def _bbox(mask: torch.Tensor) -> tuple[int, int]:
    rows, cols = mask.flatten(0, -3).amax(0).nonzero(as_tuple=True)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def marker_detector(unmarked: torch.Tensor, marked: torch.Tensor, masks: torch.Tensor) -> MarkerDetector:
    """Calibrate the marker rule on real unmarked images (N, C, H, W), real marked images (M, C, H, W)
    and the marked images' masks (M, 1, H, W)."""
    if len(unmarked) < 1 or len(marked) < 1:
        raise ValueError(f"unmarked/marked: {len(unmarked)} unmarked and {len(marked)} marked images; need at least one of each")
    if masks.shape[0] != len(marked) or masks.shape[-2:] != marked.shape[-2:]:
        raise ValueError(f"masks: shape {tuple(masks.shape)} does not match the marked images {tuple(marked.shape)}")
    masks = masks.float().cpu()
    if not bool((masks.flatten(1).sum(1) > 0).all()):
        raise ValueError("masks: every marked image needs a non-empty marker mask")
    marked, unmarked = marked.float().cpu(), unmarked.float().cpu()
    # 1. The rule: a fixed mask when every marked image's mask is the same, else a sliding window.
    fixed = bool((masks == masks[:1]).all())
    # 2. Polarity: is the marker brighter or darker than what it covers?
    inside = ((marked.mean(1, keepdim=True) * masks).flatten(1).sum(1) / masks.flatten(1).sum(1)).mean()
    if fixed:
        m = masks[0]
        base = ((unmarked.mean(1, keepdim=True) * m).flatten(1).sum(1) / m.sum()).mean()
    else:
        m, base = None, unmarked.mean()
    polarity = 1.0 if float(inside) >= float(base) else -1.0
    # 3. Threshold: the midpoint of the mean scores of the real unmarked and marked images.
    det = MarkerDetector("mask" if fixed else "window", m, _bbox(masks[0]), polarity, 0.0, 0.0, 0.0, float("nan"))
    su, sm = det.score(unmarked), det.score(marked)
    det.unmarked_score, det.marked_score = float(su.mean()), float(sm.mean())
    det.threshold = (det.unmarked_score + det.marked_score) / 2
    det.real_accuracy = float(torch.cat([su <= det.threshold, sm > det.threshold]).float().mean())
    return det


@dataclass
class MarkerRates:
    drawn: float  # share of raised decodes of unmarked images with the marker
    removed: float  # share of lowered decodes of marked images without it
    drawn_in_reconstruction: float  # share of plain reconstructions of unmarked images with a marker (false alarms)
    kept_in_reconstruction: float  # share of plain reconstructions of marked images that keep it


def share(flags: torch.Tensor) -> float:
    """Share of True in flags (N,) bool; NaN when N = 0."""
    return float(flags.float().mean()) if len(flags) else float("nan")


def marker_rates(
    detector: MarkerDetector,
    raised: torch.Tensor,
    lowered: torch.Tensor,
    unmarked_reconstruction: torch.Tensor,
    marked_reconstruction: torch.Tensor,
) -> MarkerRates:
    """Score decoded images with a calibrated detector (the judgement half of `marker_effect`)."""
    return MarkerRates(
        share(detector.present(raised)),
        share(~detector.present(lowered)),
        share(detector.present(unmarked_reconstruction)),
        share(detector.present(marked_reconstruction)),
    )
