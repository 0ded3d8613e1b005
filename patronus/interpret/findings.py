"""Calibrated shortcut flags and one finding per confounder.

A fixed threshold on the explained-away score (`shortcut_report.association`) flags weak,
chance-level associations on one dataset and misses real ones on another: its spread depends
on the number of images, prototypes, targets and candidate confounders. Here a prototype is
flagged by two permutation tests, each at family-wise level `alpha` over every prototype,
target and confounder (max-T, Westfall & Young 1993):

  (a) H0a "J carries nothing of c beyond the target": shuffle c within the strata of t, which
      keeps how often c and t co-occur and breaks any link of J to c that the target does not
      explain. Rejects for a marker detector, not for a genuine class detector.
  (b) H0b "the target is not linked to (s, c)": shuffle the target rows. Rejects only when the
      target-confounder correlation is larger than chance — on data without a shortcut (the
      marker independent of the class, or absent), the score is chance and nothing is flagged.

A shortcut is "not H0a and not H0b"; requiring both rejections (an intersection-union test) keeps
the report's false-alarm rate at most `alpha`: with probability ≥ 1 − alpha nothing is flagged on
data without a shortcut. The p-value of J is the larger of its two adjusted p-values.

With thousands of images both tests also reject for links too weak to matter (a marker on 5% of
one class and none of the other). The statistic therefore only counts (t, c) pairs whose
confounder rates differ by at least `min_effect` between the target and the rest
(`rate_difference`: a perfect detector of such a confounder reaches at most AUROC 0.5 +
min_effect / 2 on the target). Shuffling c within t keeps that difference, and shuffling the
targets recomputes it, so both nulls are those of the gated statistic and the rate stays ≤ alpha.

Flagged prototypes that carry the same confounder, or that fire together at the same position
(activations correlated, closest cells within one feature cell of each other) form one finding: the unit the causal check and the mitigation act on, since one
prototype of a redundant group moved alone is undone by the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from patronus.data.shortcuts import rate_difference
from patronus.interpret.quality import auroc_matrix, fast_auroc
from patronus.interpret.shortcut_report import stratified_auroc


def explained_scores(s: torch.Tensor, targets: torch.Tensor, confounders: torch.Tensor, min_effect: float = 0.0) -> torch.Tensor:
    """(T, C, K) explained-away AUROC u(J, t) − u_within-c(J, t) where u > 0.5, else 0 (rows with a
    NaN target or confounder left out of that pair; pairs whose confounder rates differ by less
    than `min_effect` between target and rest are 0): the statistic both tests share."""
    T, C, K = targets.shape[1], confounders.shape[1], s.shape[1]
    out = torch.zeros(T, C, K)
    for t in range(T):
        for c in range(C):
            if min_effect > 0 and not abs(rate_difference(targets[:, t], confounders[:, c])) >= min_effect:
                continue
            rows = ~(targets[:, t].isnan() | confounders[:, c].isnan())
            ss, y, cc = s[rows], targets[rows, t], confounders[rows, c]
            raw = fast_auroc(ss, y)
            within = stratified_auroc(ss, y, cc)
            out[t, c] = (raw - within).where(raw > 0.5, torch.zeros(())).nan_to_num(0.0)
    return out


def _shuffle_within(c: torch.Tensor, strata: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """c with its values permuted inside each stratum (NaN strata rows keep theirs)."""
    out = c.clone()
    for v in strata[~strata.isnan()].unique():
        idx = (strata == v).nonzero().flatten()
        out[idx] = c[idx[torch.randperm(len(idx), generator=gen)]]
    return out


@dataclass
class FlagTest:
    """The calibrated flag decision for every prototype."""

    alpha: float  # family-wise false-alarm rate of the whole report
    permutations: int
    min_effect: float  # smallest target-confounder rate difference counted as a possible shortcut
    tested_pairs: int  # (target, confounder) pairs whose rates differ by at least min_effect
    score: torch.Tensor  # (K,) observed max over (t, c) of the explained-away score
    p_conditional: torch.Tensor  # (K,) adjusted p of H0a (J carries nothing of c beyond t)
    p_association: torch.Tensor  # (K,) adjusted p of H0b (no target-confounder link beyond chance)
    null_conditional: torch.Tensor  # (B,) max score over everything per shuffle of c within t
    null_association: torch.Tensor  # (B,) the same per shuffle of the targets

    @property
    def p_value(self) -> torch.Tensor:
        """(K,) intersection-union p-value: a shortcut needs both nulls rejected."""
        return torch.maximum(self.p_conditional, self.p_association)

    @property
    def flagged(self) -> list[int]:
        """Prototypes flagged at level alpha, by score (best first)."""
        order = self.score.argsort(descending=True, stable=True).tolist()
        return [j for j in order if float(self.p_value[j]) <= self.alpha and float(self.score[j]) > 0]

    def threshold(self) -> float:
        """The score a prototype needed to be flagged: the larger (1 − alpha) quantile of the two nulls
        (NaN when no pair reached the minimum effect: nothing could be flagged)."""
        if not self.tested_pairs:
            return float("nan")
        q = lambda t: float(torch.quantile(t.double(), 1 - self.alpha)) if len(t) else float("nan")  # noqa: E731
        return max(q(self.null_conditional), q(self.null_association))


def flag_test(
    s: torch.Tensor,
    targets: torch.Tensor,
    confounders: torch.Tensor,
    alpha: float = 0.05,
    permutations: int = 200,
    seed: int = 0,
    min_effect: float = 0.1,
) -> FlagTest:
    """Both permutation tests (module docstring) on activations s (N, K), targets (N, T), confounders (N, C)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha}; expected a false-alarm rate in (0, 1)")
    if not 0 <= min_effect < 1:
        raise ValueError(f"min_effect={min_effect}; expected a rate difference in [0, 1)")
    if permutations < 1 / alpha - 1:
        raise ValueError(f"permutations={permutations}: too few to reach alpha={alpha}; use at least {int(1 / alpha)}")
    K = s.shape[1]
    s = s.float().cpu()
    observed = explained_scores(s, targets, confounders, min_effect)
    score = observed.flatten(0, 1).amax(0) if observed.numel() else torch.zeros(K)
    gen = torch.Generator().manual_seed(seed)
    null_a, null_b = torch.zeros(permutations), torch.zeros(permutations)
    if observed.numel():
        T, C = targets.shape[1], confounders.shape[1]
        for b in range(permutations):
            best = 0.0
            for t in range(T):
                shuffled = torch.stack([_shuffle_within(confounders[:, c], targets[:, t], gen) for c in range(C)], 1)
                best = max(best, float(explained_scores(s, targets[:, t : t + 1], shuffled, min_effect).max()))
            null_a[b] = best
            perm = torch.randperm(len(s), generator=gen)
            null_b[b] = float(explained_scores(s, targets[perm], confounders, min_effect).max())
    adjusted = lambda null: (1 + (null[None, :] >= score[:, None] - 1e-7).sum(1)).float() / (permutations + 1)  # noqa: E731
    tested = sum(
        abs(rate_difference(targets[:, t], confounders[:, c])) >= min_effect
        for t in range(targets.shape[1])
        for c in range(confounders.shape[1])
    )
    return FlagTest(alpha, permutations, min_effect, tested, score, adjusted(null_a), adjusted(null_b), null_a, null_b)


# --- grouping ------------------------------------------------------------------------------


def same_position(where: torch.Tensor, j: int, k: int, rows: torch.Tensor, grid_width: int, cells: int = 1) -> float:
    """Share of images `rows` where prototypes j and k fire within `cells` feature cells of each
    other (Chebyshev distance of their closest cells; `where` (N, K) flat cell indices)."""
    if len(rows) == 0:
        return 0.0
    yj, xj = where[rows, j] // grid_width, where[rows, j] % grid_width
    yk, xk = where[rows, k] // grid_width, where[rows, k] % grid_width
    return float((((yj - yk).abs() <= cells) & ((xj - xk).abs() <= cells)).float().mean())


@dataclass
class Finding:
    """One confounder at one place: the prototypes that carry it, flagged together."""

    prototypes: list[int]  # the best detector of the confounder first: its boxes show where the confounder is
    target: int  # index into the targets
    confounder: int  # index into the candidate confounders
    score: float  # the highest explained-away score among the members
    p_value: float  # the smallest member p-value (family-wise adjusted)
    same_position: list[int] = field(default_factory=list)  # members whose closest cell is within one cell of the best one's


def group_findings(
    flagged: Sequence[int],
    s: torch.Tensor,
    where: torch.Tensor,
    score: torch.Tensor,
    p_value: torch.Tensor,
    target_of: torch.Tensor,
    confounder_of: torch.Tensor,
    confounders: torch.Tensor,
    grid_width: int,
    min_same_position: float = 0.5,
    min_correlation: float = 0.5,
) -> list[Finding]:
    """Flagged prototypes → findings (connected components): j and k are linked when they carry the
    same confounder (one finding per confounder), or when their activations correlate at
    ≥ `min_correlation` and they fire at the same position (≥ `min_same_position` of their top
    activating images). Each finding records which members fire where its best one does.
    A finding leads with the member that best detects its confounder (sign-free AUROC): with the
    marker on every image of a class, a class-shape prototype can out-score the marker's own
    detector, and its boxes would show the digit, not the marker. Findings are ordered by their
    best score."""
    flagged = list(flagged)
    if not flagged:
        return []
    corr = torch.corrcoef(s[:, flagged].double().T).nan_to_num(0.0).reshape(len(flagged), len(flagged))
    n_top = max(1, len(s) // 10)

    def rows_for(j: int, k: int) -> torch.Tensor:
        c = int(confounder_of[j])
        if confounders.shape[1] and c == int(confounder_of[k]):
            return (confounders[:, c] == 1).nonzero().flatten()
        top = torch.cat([s[:, j].topk(n_top).indices, s[:, k].topk(n_top).indices])
        return top.unique()

    def linked(a: int, b: int) -> bool:
        j, k = flagged[a], flagged[b]
        if confounders.shape[1] and int(confounder_of[j]) == int(confounder_of[k]):
            return True  # one finding per confounder, wherever its carriers look (their positions are reported)
        return corr[a, b] >= min_correlation and same_position(where, j, k, rows_for(j, k), grid_width) >= min_same_position

    parent = list(range(len(flagged)))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a in range(len(flagged)):
        for b in range(a + 1, len(flagged)):
            if root(a) != root(b) and linked(a, b):
                parent[root(b)] = root(a)
    groups: dict[int, list[int]] = {}
    for a, j in enumerate(flagged):
        groups.setdefault(root(a), []).append(j)
    findings = []
    for members in groups.values():
        top = max(members, key=lambda j: float(score[j]))
        detects = (
            auroc_matrix(s[:, members], confounders[:, int(confounder_of[top])][:, None])[0].nan_to_num(0.0)
            if confounders.shape[1]
            else torch.zeros(len(members))
        )  # no confounder: by score alone
        order = sorted(range(len(members)), key=lambda i: (-float(detects[i]), -float(score[members[i]])))
        members = [members[i] for i in order]
        best = members[0]
        rows = (
            (confounders[:, int(confounder_of[top])] == 1).nonzero().flatten() if confounders.shape[1] else s[:, best].topk(n_top).indices
        )
        at_position = [j for j in members if same_position(where, best, j, rows, grid_width) >= min_same_position]
        findings.append(
            Finding(
                members,
                int(target_of[top]),
                int(confounder_of[top]),
                float(score[top]),
                float(min(float(p_value[j]) for j in members)),
                at_position,
            )
        )
    return sorted(findings, key=lambda f: -f.score)


def neutral_values(
    s: torch.Tensor, confounder: torch.Tensor, target: Optional[torch.Tensor] = None, min_images: int = 10
) -> tuple[torch.Tensor, str]:
    """(K,) what "the confounder is absent" looks like in s: the median over images WITHOUT it —
    of the target class when it has at least `min_images` such images, else of all classes (the
    dataset median is "present" once most images carry the confounder). Returns the source too."""
    without = confounder == 0
    if target is not None:
        rows = without & (target == 1)
        if int(rows.sum()) >= min_images:
            return s[rows].median(0).values, "target images without the confounder"
    if int(without.sum()) == 0:
        raise ValueError("confounder: every image carries it; there is no image to take a neutral value from")
    return s[without].median(0).values, "images without the confounder"
