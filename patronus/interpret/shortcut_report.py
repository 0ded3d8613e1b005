"""Automatic shortcut report: which prototype carries a confounder instead of the target, where it
fires, when it appears, and whether editing it changes what a classifier on prototypes predicts.

Nothing says which attribute is the confounder. The targets are what the user cares about (the
class label by default, or named attributes); every other attribute of the dataset is a
candidate confounder. The evidence, per prototype J:

1. Association, explained away (data only, all K prototypes). J predicts target t with AUROC
   u(J, t). If J only "knows" t through a confounder c, J stops predicting t *within* the strata
   of c: a marker detector separates 7s from other digits overall (most 7s carry the marker),
   but not among marked images, nor among unmarked ones. The score is
       explained(J, t, c) = u(J, t) − u_within-c(J, t)
   (both oriented the same way; u_within pools the strata weighted by their positive × negative
   pairs). A genuine "7" prototype keeps its AUROC within the strata: its score stays near 0.
   The ranking is by max over (t, c) of that score.
2. Causal check (top candidates): sample from real images' activations with s_J at its dataset
   low and high (the same fresh x_T for both: an inverted x_T would carry the confounder's
   pixels itself and hide whether the model *draws* it from s_J), re-encode, and see how linear probes on the activations change their prediction of
   every attribute; plus how local the pixel change is (share inside J's receptive field).
3. Where: the top activating real patches with receptive-field boxes, and information maps
   (`patronus.interpret.information`); when: the emergence time of a raised J.
4. NeuroInspect-style counterfactuals: for a linear classifier's mistakes on held-out images,
   which single-prototype edit (set to its low, median or high) flips the prediction to the
   truth.
5. Mitigation: decoding with a finding's prototypes held at their neutral value (the median over
   images WITHOUT the confounder), scored by worst-group accuracy (`patronus.interpret.mitigation`),
   and a config to fine-tune with them held (`PatronusModule.held_prototypes`).

Flagging is calibrated by permutation tests and flagged prototypes are grouped into one finding
per confounder and position (`patronus.interpret.findings`); confounders linked to the target that
no prototype carries are reported as unexplained signal (`patronus.interpret.unexplained`).

When the dataset carries ground-truth confounder masks (items with `marker_mask`, e.g. the
planted-marker builder), the report also scores itself: do the boxes land on the marker, do
the maps cover it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from patronus.data.shortcuts import phi
from patronus.edits import set_prototypes
from patronus.interpret.quality import auroc_matrix, class_indicators, fast_auroc, fit_logistic, predict_proba
from patronus.pipeline import PatronusPipeline

# --- 1. association ----------------------------------------------------------------------


def split_targets(
    attributes: torch.Tensor,
    names: Sequence[str],
    labels: torch.Tensor,
    classes: Sequence[str],
    targets: Optional[Sequence[str]] = None,
) -> tuple[torch.Tensor, list[str], torch.Tensor, list[str]]:
    """(target columns, names, candidate-confounder columns, names).

    Targets: the named attributes, else one "class=c" column per class when the data has class
    labels, else every attribute. Confounders: every attribute that is not a target (columns
    that merely repeat the class label, as MNIST's one-hot digits do, are left out).
    """
    names = list(names)
    if targets:
        missing = [t for t in targets if t not in names]
        if missing:
            raise ValueError(f"targets {missing}: not attributes of this dataset; it has {names}")
        t_idx = [names.index(t) for t in targets]
        t_cols, t_names = attributes[:, t_idx], list(targets)
        rest = [i for i in range(len(names)) if i not in t_idx]
    elif bool((labels >= 0).any()) and classes:
        t_cols, t_names = class_indicators(labels, list(classes))
        rest = [i for i, n in enumerate(names) if n not in classes]
    else:
        t_cols, t_names, rest = attributes, names, list(range(len(names)))
    return t_cols, t_names, attributes[:, rest], [names[i] for i in rest]


def stratified_auroc(s: torch.Tensor, target: torch.Tensor, stratum: torch.Tensor) -> torch.Tensor:
    """Raw AUROC (K,) of each prototype for `target` within the strata of a binary `stratum`,
    pooled with weights = positive × negative pairs per stratum (NaN where no stratum has both)."""
    total, weight = torch.zeros(s.shape[1], dtype=torch.double), 0.0
    for v in (0.0, 1.0):
        rows = (stratum == v) & ~target.isnan()
        y = target[rows]
        pairs = float((y == 1).sum() * (y == 0).sum())
        if pairs == 0:
            continue
        total += pairs * fast_auroc(s[rows], y).double()
        weight += pairs
    return (total / weight).float() if weight else torch.full((s.shape[1],), float("nan"))


@dataclass
class Association:
    """Explained-away association of every prototype with every (target, confounder) pair."""

    target_names: list[str]
    confounder_names: list[str]
    auroc: torch.Tensor  # (T, K) sign-free AUROC for each target
    confounder_auroc: torch.Tensor  # (C, K)
    explained: torch.Tensor  # (T, C, K) u(J, t) − u_within-c(J, t) where u > 0.5, else 0
    phi: torch.Tensor  # (T, C) correlation of target and confounder in the data
    score: torch.Tensor = field(init=False)  # (K,) max over (t, c)
    target_of: torch.Tensor = field(init=False)  # (K,)
    confounder_of: torch.Tensor = field(init=False)  # (K,)

    def __post_init__(self) -> None:
        T, C, K = self.explained.shape
        if T * C == 0:
            self.score = torch.zeros(K)
            self.target_of = self.confounder_of = torch.zeros(K, dtype=torch.long)
            return
        flat = self.explained.reshape(T * C, K)
        self.score, arg = flat.max(0)
        self.target_of, self.confounder_of = arg // C, arg % C

    def ranking(self) -> list[int]:
        return self.score.argsort(descending=True, stable=True).tolist()


def association(
    s: torch.Tensor, targets: torch.Tensor, target_names: Sequence[str], confounders: torch.Tensor, confounder_names: Sequence[str]
) -> Association:
    """Explained-away scores of activations s (N, K) for every target × confounder pair."""
    K = s.shape[1]
    raw = auroc_matrix(s, targets, sign_free=False)  # (T, K)
    explained = torch.zeros(targets.shape[1], confounders.shape[1], K)
    corr = torch.full((targets.shape[1], confounders.shape[1]), float("nan"))
    for t in range(targets.shape[1]):
        for c in range(confounders.shape[1]):
            within = stratified_auroc(s, targets[:, t], confounders[:, c])
            # Only J firing *more* on t counts: a prototype is a presence detector, and "fires less
            # on class 0" is usually "detects another class" — which stratifying by a confounder
            # correlated with that other class also dilutes, without any shortcut involved.
            explained[t, c] = (raw[t] - within).where(raw[t] > 0.5, torch.zeros(())).nan_to_num(0.0)
            corr[t, c] = phi(targets[:, t], confounders[:, c])
    conf_auroc = auroc_matrix(s, confounders) if confounders.shape[1] else torch.zeros(0, K)
    oriented = torch.maximum(raw, 1 - raw).nan_to_num(0.5)
    return Association(list(target_names), list(confounder_names), oriented, conf_auroc, explained, corr)


def location_concentration(s: torch.Tensor, where: torch.Tensor, top_fraction: float = 0.1) -> torch.Tensor:
    """(K,) share of J's most active images whose argmin cell is J's most common cell there.

    1 means "always the same spot" — typical of a pasted marker or a scanner label, also of a
    few genuine concepts with a fixed position (a digit's top bar), so it is context, not proof.
    """
    n = max(1, int(round(top_fraction * len(s))))
    top = s.topk(n, dim=0).indices  # (n, K)
    cells = where.gather(0, top)  # (n, K)
    return torch.tensor([float(torch.bincount(cells[:, j]).max()) / n for j in range(s.shape[1])])


# --- 2. probes and the causal check --------------------------------------------------------


@dataclass
class LinearProbe:
    """Logistic regression on standardised activations (what a downstream classifier would be)."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # (K+1, classes)

    @classmethod
    def fit(cls, s: torch.Tensor, y: torch.Tensor, num_classes: int = 2) -> LinearProbe:
        mean, std = s.double().mean(0), s.double().std(0).clamp_min(1e-8)
        return cls(mean, std, fit_logistic((s.double() - mean) / std, y.long(), num_classes))

    def proba(self, s: torch.Tensor) -> torch.Tensor:
        return predict_proba(self.weight, (s.double().cpu() - self.mean) / self.std).float()


def fit_attribute_probes(s: torch.Tensor, attributes: torch.Tensor) -> list[Optional[LinearProbe]]:
    """One binary probe per attribute (None where the rows hold one class only)."""
    probes = []
    for a in range(attributes.shape[1]):
        known = ~attributes[:, a].isnan()
        y = attributes[known, a]
        probes.append(LinearProbe.fit(s[known], y) if y.unique().numel() == 2 else None)
    return probes


def probe_predictions(probes: Sequence[Optional[LinearProbe]], s: torch.Tensor) -> torch.Tensor:
    """P(attribute = 1) (N, A); NaN for attributes without a probe."""
    cols = [p.proba(s)[:, 1] if p is not None else torch.full((len(s),), float("nan")) for p in probes]
    return torch.stack(cols, 1)


@dataclass
class CausalEffect:
    prototype: int  # the unit's best prototype (its box is the one locality is measured in)
    low: float  # the best prototype's low / high values
    high: float
    delta: list[float]  # (A,) mean over images of P(a | unit high) − P(a | unit low), on decoded images
    measured_low: float  # s_J re-encoded from the low / high decodes (did the edit take?)
    measured_high: float
    locality: float  # share of |x_high − x_low| inside J's receptive-field box in x_high
    prototypes: list[int] = field(default_factory=list)  # every prototype moved together (a finding's group)


def sample_edited(pipe: PatronusPipeline, x_T: torch.Tensor, s_edit: torch.Tensor, s: torch.Tensor, steps: int) -> torch.Tensor:
    """DDIM-decode a FRESH x_T under edited activations s_edit (with the pipeline's edit guidance
    relative to the unedited s): the report's one way to turn edits into images.

    x̂0 is clipped to [-1, 1] at every step, as in `PatronusPipeline.sample` (the training monitor's
    clean grids). Unclipped decoding is right for an *inverted* latent, which reproduces its image;
    from fresh noise, a short schedule on a small model lets x̂0 drift out of range at the early,
    large steps and the sample ends as noise, black or washed out."""
    return pipe.decode_edited(x_T, s_edit, s, steps, clip=True).clamp(-1, 1)


def causal_effect(
    pipe: PatronusPipeline,
    x_T: torch.Tensor,
    s: torch.Tensor,
    prototypes: Union[int, Sequence[int]],
    low: torch.Tensor,
    high: torch.Tensor,
    probes: Sequence[Optional[LinearProbe]],
    steps: int,
) -> tuple[CausalEffect, torch.Tensor, torch.Tensor]:
    """Sample the same x_T with every prototype of the unit at its low and at its high value
    (low/high: (K,) per-prototype values); probe both. Returns the effect and the two samples."""
    unit = [prototypes] if isinstance(prototypes, int) else list(prototypes)
    j = unit[0]
    x_low, x_high = (sample_edited(pipe, x_T, set_prototypes(s, unit, v.to(s)), s, steps) for v in (low, high))
    s_low, acts_high = pipe.encode(x_low).s, pipe.encode(x_high)
    s_high, where = acts_high.s, acts_high.where
    delta = (probe_predictions(probes, s_high.cpu()) - probe_predictions(probes, s_low.cpu())).mean(0)
    enc = pipe.model.encoder
    _, w = enc.feature_shape()
    rf = enc.receptive_field()
    change = (x_high - x_low).abs().sum(1)  # (B, H, W)
    inside = []
    for b in range(len(x_T)):
        top, left, bottom, right = rf.box(*divmod(int(where[b, j]), w))
        inside.append(float(change[b, top:bottom, left:right].sum() / change[b].sum().clamp_min(1e-12)))
    effect = CausalEffect(
        j,
        float(low[j]),
        float(high[j]),
        delta.tolist(),
        float(s_low[:, j].mean()),
        float(s_high[:, j].mean()),
        sum(inside) / len(inside),
        unit,
    )
    return effect, x_low, x_high


# --- 3. counterfactuals for a classifier's mistakes (NeuroInspect-style) --------------------


@dataclass
class Counterfactuals:
    mistakes: int
    fixed_by: list[float]  # (K,) share of mistakes that one edit of J flips to the truth
    best_value: list[str]  # (K,) which edit ("low" / "median" / "high") fixes most
    examples: list[dict]  # a few (image index, prototype, value, from, to)


def counterfactual_flips(
    probe: LinearProbe, s: torch.Tensor, y: torch.Tensor, values: dict[str, torch.Tensor], max_examples: int = 8
) -> Counterfactuals:
    """For each mistake of `probe` on (s, y), which single-prototype edit makes it right."""
    pred = probe.proba(s).argmax(1)
    wrong = (pred != y).nonzero().flatten()
    K = s.shape[1]
    fixed = torch.zeros(len(values), K)
    examples = []
    for v, (name, vals) in enumerate(values.items()):
        for j in range(K):
            now = probe.proba(set_prototypes(s[wrong], [j], vals)).argmax(1)
            ok = now == y[wrong]
            fixed[v, j] = ok.float().mean() if len(wrong) else 0.0
            for i in ok.nonzero().flatten().tolist()[: max(0, max_examples - len(examples))]:
                n = int(wrong[i])
                examples.append({"image": n, "prototype": j, "edit": name, "from": int(pred[n]), "to": int(now[i])})
    best, arg = fixed.max(0)
    names = list(values)
    return Counterfactuals(len(wrong), best.tolist(), [names[int(a)] for a in arg], examples)


# --- 4. ground truth where the data has it ----------------------------------------------


def box_hits_mask(box: tuple[int, int, int, int], mask: torch.Tensor, share: float = 0.5) -> bool:
    """Does the box hold at least `share` of the mask's pixels (mask (1, H, W) or (H, W))?"""
    m = mask.reshape(mask.shape[-2:])
    top, left, bottom, right = box
    total = float(m.sum())
    return total > 0 and float(m[top:bottom, left:right].sum()) >= share * total


def mask_coverage(maps: torch.Tensor, masks: torch.Tensor) -> tuple[float, float]:
    """(share of the maps' mass inside the masks, share of the image the masks cover): maps (B, H, W)."""
    m = masks.reshape(maps.shape).float()
    keep = m.flatten(1).sum(1) > 0
    if not keep.any():
        return float("nan"), float("nan")
    maps, m = maps[keep].clamp_min(0), m[keep]
    inside = (maps * m).flatten(1).sum(1) / maps.flatten(1).sum(1).clamp_min(1e-12)
    return float(inside.mean()), float(m.mean())


# --- 5. mitigation --------------------------------------------------------------------------


def neutralised_decode(
    pipe: PatronusPipeline, x_T: torch.Tensor, s: torch.Tensor, prototypes: Sequence[int], neutral: torch.Tensor, steps: int
) -> torch.Tensor:
    """Sample x_T with the finding's prototypes held at their neutral value (from images without the
    confounder): the image without the shortcut."""
    return sample_edited(pipe, x_T, set_prototypes(s, prototypes, neutral.to(s)), s, steps)


def finetune_config(prototypes: Sequence[int], neutral: torch.Tensor, init_from: str) -> str:
    """YAML overrides that fine-tune a run with the finding's prototypes held at their neutral value."""
    held = "\n".join(f"    {j}: {float(neutral[j]):.6g}" for j in prototypes)
    return (
        "# Fine-tune with the finding's prototypes held at their neutral value, the median over images\n"
        "# without the confounder (shortcut report):\n"
        "# python train.py --config <the run's preset> --config <this file>\n"
        f"run_dir: {Path(init_from).with_suffix('')}_held\n"
        "model:\n"
        f"  init_from: {init_from}\n"
        "  held_prototypes:\n"
        f"{held}\n"
    )
