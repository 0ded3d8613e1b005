"""Per-prototype activation statistics over a dataset split (cached by `patronus.runs`).

"max" for an edit should be a high quantile over real data, not the maximum of one random
batch (the paper's notebooks): one outlier image would set every edit's strength.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from patronus.edits import activation_range

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


@torch.no_grad()
def activation_statistics(activations: torch.Tensor, quantiles: Sequence[float] = QUANTILES) -> dict[str, Any]:
    """Mean, std and quantiles per prototype of activations (N, K); 'max'/'min' = q99/q01."""
    s = activations.double()
    q = torch.quantile(s, torch.tensor(quantiles, dtype=s.dtype), dim=0)
    lo, hi = activation_range(activations)  # the one definition of an edit's 'min'/'max'
    return {
        "n": len(s),
        "mean": s.mean(0).tolist(),
        "std": s.std(0).tolist(),
        "quantiles": {f"{p:g}": row.tolist() for p, row in zip(quantiles, q)},
        "min": lo.tolist(),
        "max": hi.tolist(),
    }


def edit_levels(stats: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Named per-prototype values (K,) that edits and baselines refer to: max (q99), min (q01),
    median, mean, every stored quantile as qNN (q05, q95, ...) and the unit sd."""
    levels = {"max": torch.tensor(stats["max"]), "min": torch.tensor(stats["min"]),
              "median": torch.tensor(stats["quantiles"]["0.5"]), "mean": torch.tensor(stats["mean"]),
              "sd": torch.tensor(stats["std"])}
    levels |= {f"q{round(float(q) * 100):02d}": torch.tensor(v) for q, v in stats["quantiles"].items()}
    return levels
