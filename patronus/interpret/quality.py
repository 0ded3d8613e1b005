"""Prototype quality (Patronus §4.2): linear probes, TAD and attributes captured — on held-out folds.

The paper (via InfoDiffusion's evaluation code) computes TAD on the *training* fold of each
split; here every number comes from the fold the probe or the statistic was not fit on.
TAD follows NashAE (Yeats et al. 2022): per attribute, the gap between the best and the
second-best single-prototype AUROC, summed over attributes that are *captured* (best AUROC
≥ 0.75) and not largely explained by another attribute (max mutual information with another
attribute ≤ 20% of its entropy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc, multiclass_accuracy, multilabel_auroc

CAPTURED_AUROC = 0.75  # NashAE's threshold for "this attribute has a detector"
MAX_SHARED_INFORMATION = 0.2  # attributes mostly predictable from another one are left out


def kfold_indices(n: int, folds: int = 5, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled (train, held-out) index pairs covering every row once as held-out."""
    if n < folds:
        raise ValueError(f"{n} rows cannot be split into {folds} folds")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    chunks = perm.tensor_split(folds)
    return [(torch.cat([c for k, c in enumerate(chunks) if k != i]), chunks[i]) for i in range(folds)]


def auroc_matrix(activations: torch.Tensor, attributes: torch.Tensor, sign_free: bool = True) -> torch.Tensor:
    """Sign-free AUROC (A, K) of each prototype alone as a detector of each binary attribute.

    max(AUROC, 1 − AUROC): a prototype that fires *less* on an attribute also detects it
    (`sign_free=False` keeps the orientation, for comparisons across strata).
    Rows with a NaN attribute are left out of that attribute; an attribute with one class only
    in these rows gets NaN.
    """
    s = activations.double()
    lo, hi = s.min(0).values, s.max(0).values
    scores = ((s - lo) / (hi - lo).clamp_min(1e-12)).float()  # in [0, 1] so torchmetrics uses them as given
    out = torch.full((attributes.shape[1], s.shape[1]), float("nan"))
    for a in range(attributes.shape[1]):
        known = ~attributes[:, a].isnan()
        y = attributes[known, a].long()
        if y.unique().numel() < 2:
            continue
        if s.shape[1] == 1:  # torchmetrics' multilabel form needs two or more labels
            auc = binary_auroc(scores[known, 0], y)[None]
        else:
            target = y[:, None].expand(-1, s.shape[1])
            auc = multilabel_auroc(scores[known], target, num_labels=s.shape[1], average=None)
        out[a] = torch.maximum(auc, 1 - auc) if sign_free else auc
    return out


def fast_auroc(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """AUROC (K,) of each column of s (n, K) for binary y (n,): P(s⁺ > s⁻) + ½ P(s⁺ = s⁻), ties exact.
    NaN when y holds one class only. The shortcut report's permutation tests call it thousands
    of times, where torchmetrics' per-call overhead dominates."""
    pos, neg = s[y == 1].double(), s[y == 0].double()
    if len(pos) == 0 or len(neg) == 0:
        return torch.full((s.shape[1],), float("nan"))
    neg_sorted = neg.T.contiguous().sort(dim=1).values  # (K, n0)
    values = pos.T.contiguous()  # (K, n1)
    below = torch.searchsorted(neg_sorted, values, right=False).double()
    upto = torch.searchsorted(neg_sorted, values, right=True).double()
    return ((below + upto) / 2).sum(1).div(len(pos) * len(neg)).float()


def binary_entropy_and_mi(attributes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy (A,) and pairwise mutual information (A, A) of binary attributes, in nats."""
    y = attributes.nan_to_num(0).double()
    n = len(y)
    p1 = y.mean(0)
    joint = {  # P(a_i = u, a_j = v) for u, v in {0, 1}
        (1, 1): y.T @ y / n,
        (1, 0): y.T @ (1 - y) / n,
        (0, 1): (1 - y).T @ y / n,
        (0, 0): (1 - y).T @ (1 - y) / n,
    }
    marg = {1: p1, 0: 1 - p1}
    mi = torch.zeros(y.shape[1], y.shape[1], dtype=torch.double)
    for (u, v), pj in joint.items():
        outer = marg[u][:, None] * marg[v][None, :]
        term = pj * torch.log(pj / outer)
        mi += torch.where((pj > 0) & (outer > 0), term, torch.zeros_like(term))
    return mi.diagonal().clone(), mi


@dataclass
class TADResult:
    tad: float
    captured: list[int]  # attribute indices that count towards TAD
    best_prototype: list[int]  # (A,) the best single detector of each attribute
    gap: list[float]  # (A,) best − second-best AUROC
    auroc: torch.Tensor  # (A, K)


def tad(activations: torch.Tensor, attributes: torch.Tensor) -> TADResult:
    """Total AUROC Difference: how much each captured attribute has one prototype to itself."""
    auc = auroc_matrix(activations, attributes)
    best, arg = auc.nan_to_num(0.5).max(1)
    rest = auc.nan_to_num(0.5).scatter(1, arg[:, None], 0.0)
    gap = best - rest.max(1).values
    entropy, mi = binary_entropy_and_mi(attributes)
    shared = (mi - torch.diag(mi.diagonal())).max(1).values / entropy.clamp_min(1e-12)
    keep = (best >= CAPTURED_AUROC) & (shared <= MAX_SHARED_INFORMATION) & (entropy > 0)
    captured = keep.nonzero().flatten().tolist()
    return TADResult(float(gap[keep].sum()), captured, arg.tolist(), gap.tolist(), auc)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float = 1.0, max_iter: int = 100) -> torch.Tensor:
    """Multinomial logistic regression with sklearn's objective (0.5‖W‖² + C·Σ log-loss); returns (D+1, C) weights."""
    x1 = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.double)], 1)
    w = torch.zeros(x1.shape[1], num_classes, dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-6)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x1 @ w, y, reduction="sum") + 0.5 * w[:-1].pow(2).sum() / c  # bias unpenalised
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach()


def predict_proba(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.double)], 1) @ w, dim=1)


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Z-score with the training fold's mean/std (what StandardScaler does)."""
    mean, std = train.double().mean(0), train.double().std(0).clamp_min(1e-8)
    return [(t.double() - mean) / std for t in (train, *others)]


@dataclass
class QualityReport:
    attribute_names: list[str]
    probe_auroc: list[list[float]]  # (folds, A) held-out AUROC of a linear probe per binary attribute
    class_accuracy: Optional[list[float]]  # (folds,) held-out accuracy of a linear probe on the class label
    tad: list[float]  # (folds,) TAD on each held-out fold
    captured: list[list[int]]  # per fold, the captured attributes
    auroc: torch.Tensor  # (A, K) single-prototype AUROC on all rows, for the figure

    def summary(self) -> dict:
        """Means ± stds over folds (NaN-aware: a fold without both classes of an attribute is skipped)."""
        per_attr = torch.tensor(self.probe_auroc, dtype=torch.double)  # (folds, A)
        tad_t = torch.tensor(self.tad, dtype=torch.double)
        n_cap = torch.tensor([len(c) for c in self.captured], dtype=torch.double)

        def ms(t: torch.Tensor) -> dict:
            t = t[~t.isnan()]
            return {"mean": float(t.mean()) if len(t) else float("nan"), "std": float(t.std()) if len(t) > 1 else 0.0}

        out = {
            "folds": len(self.tad),
            "tad": ms(tad_t),
            "attributes_captured": ms(n_cap),
            "captured_names": sorted({self.attribute_names[a] for fold in self.captured for a in fold}),
        }
        if per_attr.numel():
            out["probe_auroc_mean"] = ms(per_attr.nanmean(1))
            out["probe_auroc"] = {name: ms(per_attr[:, a]) for a, name in enumerate(self.attribute_names)}
        if self.class_accuracy is not None:
            out["class_accuracy"] = ms(torch.tensor(self.class_accuracy, dtype=torch.double))
        return out


def prototype_quality(
    activations: torch.Tensor,
    attributes: torch.Tensor,
    attribute_names: list[str],
    labels: Optional[torch.Tensor] = None,
    folds: int = 5,
    seed: int = 0,
) -> QualityReport:
    """k-fold linear probes (AUROC per binary attribute; accuracy for the class label) and TAD per held-out fold.

    `labels` (N,) with −1 = none: multiclass targets are scored by accuracy, as in the paper.
    """
    if attributes.shape[1] != len(attribute_names):
        raise ValueError(f"{attributes.shape[1]} attribute columns but {len(attribute_names)} names")
    has_labels = labels is not None and bool((labels >= 0).any())
    if attributes.shape[1] == 0 and not has_labels:
        raise ValueError("the dataset has neither attributes nor class labels: nothing to probe")
    probe, acc, tads, captured = [], [], [], []
    for train, held in kfold_indices(len(activations), folds, seed):
        s_tr, s_te = standardise(activations[train], activations[held])
        row = []
        for a in range(attributes.shape[1]):
            y_tr, y_te = attributes[train, a], attributes[held, a]
            k_tr, k_te = ~y_tr.isnan(), ~y_te.isnan()
            if y_tr[k_tr].unique().numel() < 2 or y_te[k_te].unique().numel() < 2:
                row.append(float("nan"))
                continue
            w = fit_logistic(s_tr[k_tr], y_tr[k_tr].long(), 2)
            p = predict_proba(w, s_te[k_te])[:, 1].float()
            row.append(float(binary_auroc(p, y_te[k_te].long())))
        probe.append(row)
        if has_labels:
            ok_tr, ok_te = labels[train] >= 0, labels[held] >= 0
            n_cls = int(labels.max()) + 1
            w = fit_logistic(s_tr[ok_tr], labels[train][ok_tr].long(), n_cls)
            pred = predict_proba(w, s_te[ok_te]).argmax(1)
            acc.append(float(multiclass_accuracy(pred, labels[held][ok_te].long(), num_classes=n_cls, average="micro")))
        if attributes.shape[1]:
            result = tad(activations[held], attributes[held])
            tads.append(result.tad)
            captured.append(result.captured)
    full = auroc_matrix(activations, attributes) if attributes.shape[1] else torch.zeros(0, activations.shape[1])
    return QualityReport(list(attribute_names), probe, acc if has_labels else None, tads, captured, full)


def class_indicators(labels: torch.Tensor, classes: list[str]) -> tuple[torch.Tensor, list[str]]:
    """One binary 'is class c' attribute per class (NaN where unlabelled): TAD for class-only datasets."""
    n_cls = max(len(classes), int(labels.max()) + 1)
    onehot = F.one_hot(labels.clamp_min(0), n_cls).float()
    onehot[labels < 0] = float("nan")
    names = [f"class={classes[c] if c < len(classes) else c}" for c in range(n_cls)]
    return onehot, names
