"""Per-prototype activation statistics over a dataset split (cached by `patronus.runs`).

An edit's high and low levels are q99 and q01 over real data, not the maximum and minimum of one
random batch (the paper's notebooks): one outlier image would set every edit's strength.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from patronus.edits import activation_range

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
# Keys of the commands' cached statistics (`keep_activations=True`); a cached file without one of
# them predates it and is recomputed.
KEYS = ("n", "mean", "std", "quantiles", "q01", "q99", "cov", "activations")


@torch.no_grad()
def activation_statistics(
    activations: torch.Tensor, quantiles: Sequence[float] = QUANTILES, keep_activations: bool = False
) -> dict[str, Any]:
    """Mean, std and quantiles per prototype of activations (N, K); q01/q99 as edits use them; the
    K x K covariance that correlated edits follow (`patronus.edits.follow_correlations`); with
    `keep_activations`, the activations themselves, that neighbours edits average
    (`patronus.edits.follow_neighbours`)."""
    s = activations.double()
    q = torch.quantile(s, torch.tensor(quantiles, dtype=s.dtype), dim=0)
    lo, hi = activation_range(activations)  # the one definition of an edit's q01/q99
    stats = {
        "n": len(s),
        "mean": s.mean(0).tolist(),
        "std": s.std(0).tolist(),
        "quantiles": {f"{p:g}": row.tolist() for p, row in zip(quantiles, q)},
        "q01": lo.tolist(),
        "q99": hi.tolist(),
        "cov": torch.cov(s.T).reshape(s.shape[1], s.shape[1]).tolist(),
    }
    if keep_activations:
        stats["activations"] = [[round(v, 6) for v in row] for row in activations.float().tolist()]
    return stats


def edit_levels(stats: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Named per-prototype values (K,) that edits and baselines refer to: every stored quantile as
    qNN (q05, q95, ...; q01 and q99 from `activation_range`), median, mean and the unit sd; and what
    coupled edits follow, not levels an edit can name: the covariance "cov" (K, K) for
    `coupling="correlated"` and the real "activations" (N, K) for `coupling="neighbours"`."""
    levels = {f"q{round(float(q) * 100):02d}": torch.tensor(v) for q, v in stats["quantiles"].items()}
    levels |= {
        "q01": torch.tensor(stats["q01"]),
        "q99": torch.tensor(stats["q99"]),
        "median": torch.tensor(stats["quantiles"]["0.5"]),
        "mean": torch.tensor(stats["mean"]),
        "sd": torch.tensor(stats["std"]),
    }
    for key in ("cov", "activations"):
        if key in stats:
            levels[key] = torch.tensor(stats[key])
    return levels
