"""Can a prototype in this run's feature space detect its planted marker, and which seed gets there?

    python benchmarks/marker_feature_probe.py --run runs/sweep_pneumonia/line_p090

When the shortcut report finds a marker's prototype but its AUROC stays low, this tells apart
"the features do not carry the marker" from "the prototype sits in the wrong position". On the run's
final encoder, scored on the group-balanced held-out set (the marker re-planted at p = q = 0.5,
so the marker is independent of the target), each read as the report reads a prototype (ProtoPNet's
minimum distance over cells; the feature distance only: a position-aware encoder's position term is
left out, so for one the numbers say what the features alone carry):

- the run's own best prototype;
- the best single feature channel at the marker's cell (what the features carry);
- a prototype vector fitted *with the labels* on half of the balanced set, scored on the other half
  (the ceiling of one prototype in this feature space);
- the centroid c of the marked cells of the run's validation images (what reseeding seeds), and
  the contrast seeds c + α·(c − μ), μ the mean feature of every cell (`reseed.contrast`).

Prints a table and writes OUT (JSON). One run's encoder is probed in ~15 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from patronus.cli.common import DataSource, load_pipeline, run_dataset
from patronus.interpret.quality import fast_auroc
from patronus.interpret.report import ReportData


def features_and_marker(run: str, pipe, split: Optional[str], balanced: bool, attribute: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature maps flattened to (N, D, cells) and the marker attribute (N,) of a split of the run's data."""
    data = ReportData.from_dataset(run_dataset(run, pipe, DataSource(None, None, split, None), group_balanced=balanced), n)
    if attribute not in data.attribute_names:
        raise ValueError(
            f"--attribute {attribute!r}: the run's data has attributes {data.attribute_names}; probe a run trained with a planted marker"
        )
    with torch.no_grad():
        z = torch.cat(
            [pipe.model.encoder.features(data.images[i : i + 256].to(pipe.device)).float().cpu() for i in range(0, len(data.images), 256)]
        )
    return z.flatten(2), data.attributes[:, data.attribute_names.index(attribute)].float()


def min_distance_auroc(z: torch.Tensor, marker: torch.Tensor, prototype: torch.Tensor) -> float:
    """Marker AUROC of one prototype read as min over cells of ||z − p||² (smaller = more similar)."""
    d = (z - prototype[None, :, None]).pow(2).sum(1).amin(1)
    return float(fast_auroc(-d[:, None], marker)[0])


def fitted_prototype(z: torch.Tensor, marker: torch.Tensor, start: torch.Tensor, steps: int = 300, lr: float = 0.01) -> torch.Tensor:
    """A prototype vector fitted with the labels: pairwise logistic ranking loss, marked nearer than unmarked."""
    p = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=lr)
    pos, neg = marker == 1, marker == 0
    for _ in range(steps):
        d = (z - p[None, :, None]).pow(2).sum(1).amin(1)
        loss = F.softplus(4 * (d[pos][:, None] - d[neg][None])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return p.detach()


def probe(run: str, group_split: str, attribute: str, alphas: list[float], num_images: int) -> dict[str, Any]:
    pipe = load_pipeline(run, "cpu")
    zb, mb = features_and_marker(run, pipe, group_split, True, attribute, num_images)
    zv, mv = features_and_marker(run, pipe, None, False, attribute, num_images)
    diff = (zb[mb == 1].mean(0) - zb[mb == 0].mean(0)).pow(2).sum(0)  # (cells,): where the marker changes the features
    cell = int(diff.argmax())
    prototypes = pipe.model.encoder.prototypes.detach().float().cpu()
    trained = [min_distance_auroc(zb, mb, p) for p in prototypes]
    best = max(range(len(trained)), key=trained.__getitem__)
    channel = fast_auroc(zb[:, :, cell], mb)
    centroid, mean = zv[mv == 1][:, :, cell].mean(0), zv.mean((0, 2))
    half = torch.randperm(len(mb), generator=torch.Generator().manual_seed(0))
    fit, held = half[: len(mb) // 2], half[len(mb) // 2 :]
    fitted = fitted_prototype(zb[fit], mb[fit], centroid)
    return {
        "run": run,
        "cell": cell,
        "grid": list(pipe.model.encoder.feature_shape()),
        "images": len(mb),
        "marked": int(mb.sum()),
        "trained_best": {"prototype": best, "auroc": trained[best]},
        "best_channel_at_cell": float(torch.maximum(channel, 1 - channel).max()),
        "fitted_with_labels_held_out": min_distance_auroc(zb[held], mb[held], fitted),
        "centroid_at_cell": float(fast_auroc(-(zb[:, :, cell] - centroid[None]).pow(2).sum(1)[:, None], mb)[0]),
        "contrast_seeds": {str(a): min_distance_auroc(zb, mb, centroid + a * (centroid - mean)) for a in alphas},
    }


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="run directory trained with a planted marker")
    ap.add_argument("--group_split", default="val", help="split re-planted at p = q = 0.5 for scoring")
    ap.add_argument("--attribute", default="marker")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0])
    ap.add_argument("--num_images", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=None, help="JSON (default: RUN/analysis/marker_feature_probe.json)")
    args = ap.parse_args(argv)
    result = probe(args.run, args.group_split, args.attribute, args.alphas, args.num_images)
    out = args.out or Path(args.run) / "analysis" / "marker_feature_probe.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"marker AUROC on {result['images']} balanced images ({result['marked']} marked); marker cell {result['cell']}")
    print(f"  run's best prototype p{result['trained_best']['prototype']}: {result['trained_best']['auroc']:.3f}")
    print(f"  best feature channel at the cell: {result['best_channel_at_cell']:.3f}")
    print(f"  prototype fitted with labels (held-out half): {result['fitted_with_labels_held_out']:.3f}")
    print(f"  marked cells' centroid, read at the cell alone: {result['centroid_at_cell']:.3f}")
    for a, v in result["contrast_seeds"].items():
        print(f"  seed c + {a}·(c − μ): {v:.3f}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
