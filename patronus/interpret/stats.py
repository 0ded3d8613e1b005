"""Per-prototype activation statistics over a dataset split, cached next to the checkpoint.

"max" for an edit should be a high quantile over real data, not the maximum of one random
batch (the paper's notebooks): one outlier image would set every edit's strength.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from patronus.interpret.edits import activation_range
from patronus.models.patronus import PatronusModel

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


def cached_statistics(model: PatronusModel, images: torch.Tensor, cache: Path, source: dict[str, Any]) -> dict[str, Any]:
    """Statistics for `images`, computed once and stored at `cache` with what they were computed on."""
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("source") == source and len(stored.get("mean", [])) == model.config.num_prototypes:
            return stored
    from patronus.sampling import encode_all  # local: sampling imports this module

    stats = {"source": source, **activation_statistics(encode_all(model, images))}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats, indent=1))
    tmp.replace(cache)
    return stats
