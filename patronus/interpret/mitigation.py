"""Scoring a mitigation the way the robustness literature does: worst-group accuracy.

Groups are target × confounder (e.g. "7 with marker", "7 without", "not 7 with", "not 7 without").
A classifier that leans on the confounder is right on the common groups and wrong on the rare
ones ("7 without marker"); its average accuracy hides that, its worst-group accuracy on a
group-balanced held-out set does not (Sagawa et al. 2020, "Distributionally robust neural
networks"). The report compares, on the same balanced held-out set, a linear classifier on the
activations:

  - as trained (natural data),
  - with the finding's prototypes held at their neutral value (what removing the shortcut from
    the representation buys), retrained on the neutralised activations,
  - a group-balanced-training baseline (the same classifier fit on a group-balanced subsample),
    the standard fix that needs the confounder labels this report had to discover.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from patronus.edits import set_prototypes
from patronus.interpret.shortcut_report import LinearProbe


def group_ids(y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(N,) group index 2·y + c of binary target y and binary confounder c (both 0/1)."""
    return (2 * y.long() + c.long()).long()


def group_accuracies(pred: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> dict[str, float]:
    """Accuracy of predictions within each (target, confounder) group present, keyed "y=1,c=0"."""
    out = {}
    for yy in (0, 1):
        for cc in (0, 1):
            rows = (y == yy) & (c == cc)
            if rows.any():
                out[f"y={yy},c={cc}"] = float((pred[rows] == y[rows]).float().mean())
    return out


def worst_group_accuracy(pred: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> float:
    """min over the (target, confounder) groups present of the accuracy within the group."""
    if len(pred) != len(y) or len(y) != len(c):
        raise ValueError(f"pred/y/c: lengths {len(pred)}, {len(y)}, {len(c)} differ")
    acc = group_accuracies(pred, y, c)
    if not acc:
        raise ValueError("y/c: no rows to score")
    return min(acc.values())


def balanced_rows(y: torch.Tensor, c: torch.Tensor, seed: int = 0, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices with the same number of images from every (target, confounder) group present
    (as many as the smallest group has), drawn without replacement from `rows` (default: all)."""
    rows = torch.arange(len(y)) if rows is None else rows
    gen = torch.Generator().manual_seed(seed)
    g = group_ids(y[rows], c[rows])
    present = [int(v) for v in g.unique()]
    if not present:
        return rows[:0]
    n = min(int((g == v).sum()) for v in present)
    picked = [rows[(g == v).nonzero().flatten()][torch.randperm(int((g == v).sum()), generator=gen)[:n]] for v in present]
    return torch.cat(picked).sort().values


@dataclass
class WorstGroup:
    """Worst-group accuracy (and per-group accuracies) of the three classifiers on the held-out set."""

    groups_present: list[str]  # groups in the held-out set ("y=1,c=0", ...); a missing one cannot be scored
    smallest_group: int  # held-out images in the rarest group: below ~10 the worst-group accuracy is a guess
    before: float
    after: float  # retrained with the finding held at its neutral value
    balanced_training: float  # baseline: fit on a group-balanced subsample, all prototypes
    before_groups: dict[str, float]
    after_groups: dict[str, float]
    balanced_training_groups: dict[str, float]
    balanced_accuracy_before: float  # accuracy on a group-balanced set (mean of the group accuracies)
    balanced_accuracy_after: float

    def as_dict(self) -> dict:
        return asdict(self)


def worst_group_scores(
    s_fit: torch.Tensor,
    y_fit: torch.Tensor,
    c_fit: torch.Tensor,
    s_test: torch.Tensor,
    y_test: torch.Tensor,
    c_test: torch.Tensor,
    prototypes: Sequence[int],
    neutral: torch.Tensor,
    seed: int = 0,
) -> WorstGroup:
    """The three classifiers of the module docstring, fit on (s_fit, y_fit), scored per group on
    (s_test, y_test, c_test). y, c: binary 0/1 (N,).

    Every held-out image is used: the accuracy within a group does not depend on how many images
    the other groups have, so it is the group-balanced set's worst-group accuracy without the
    noise of subsampling every group down to the rarest one."""
    for name, v in (("y_fit", y_fit), ("c_fit", c_fit), ("y_test", y_test), ("c_test", c_test)):
        if v.isnan().any() or not bool(((v == 0) | (v == 1)).all()):
            raise ValueError(f"{name}: expected 0/1 values without NaN")
    if y_fit.unique().numel() < 2:
        raise ValueError("y_fit: the fitting images hold one target class only")
    if len(y_test) == 0:
        raise ValueError("y_test: no held-out images to score")
    y_fit, c_fit, yt, ct = y_fit.long(), c_fit.long(), y_test.long(), c_test.long()
    neutralise = lambda s: set_prototypes(s, list(prototypes), neutral)  # noqa: E731

    def fit_predict(s_train: torch.Tensor, y_train: torch.Tensor, s_eval: torch.Tensor) -> torch.Tensor:
        return LinearProbe.fit(s_train, y_train).proba(s_eval).argmax(1)

    before = fit_predict(s_fit, y_fit, s_test)
    after = fit_predict(neutralise(s_fit), y_fit, neutralise(s_test))
    bal = balanced_rows(y_fit, c_fit, seed)
    if y_fit[bal].unique().numel() < 2:  # a group is absent from the fitting set: balance the target alone
        bal = balanced_rows(y_fit, torch.zeros_like(c_fit), seed)
    balanced = fit_predict(s_fit[bal], y_fit[bal], s_test)
    groups, groups_after = group_accuracies(before, yt, ct), group_accuracies(after, yt, ct)
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    test_groups = group_ids(yt, ct)
    smallest = min(int((test_groups == v).sum()) for v in test_groups.unique())
    return WorstGroup(
        list(groups),
        smallest,
        min(groups.values()),
        min(groups_after.values()),
        worst_group_accuracy(balanced, yt, ct),
        groups,
        groups_after,
        group_accuracies(balanced, yt, ct),
        mean(groups),
        mean(groups_after),
    )


def confounder_sensitivity(probe: LinearProbe, s_with: torch.Tensor, s_without: torch.Tensor, target_class: int = 1) -> float:
    """Mean |P(target | marker added) − P(target | marker removed)| of a classifier on the activations
    of the same images with and without the confounder ("Right for the Wrong Reason", MICCAI 2023)."""
    if s_with.shape != s_without.shape:
        raise ValueError(f"s_with/s_without: shapes {tuple(s_with.shape)} and {tuple(s_without.shape)} differ (same images expected)")
    return float((probe.proba(s_with)[:, target_class] - probe.proba(s_without)[:, target_class]).abs().mean())
