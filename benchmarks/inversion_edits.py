"""Edits: DDIM against edit-friendly inversion, prototypes moved alone or with their correlates, at
several edit guidance scales: how far an edit moves its prototype, and the reconstruction.

    python benchmarks/inversion_edits.py --runs runs/mnist_cpu --num_images 32

For each run, inversion, coupling and edit guidance w: invert the first test references, set each
of the 4 most variable prototypes to its q99 (alone, or with the others following it as in the
data: `coupling="correlated"`), decode, re-encode, and report the edit gain
(s_J(edit) − s_J(recon)) / (q99_J − s_J(recon)) over images whose gap is at least 10% of the
q01–q99 range (as `python -m patronus faithfulness` defines it), the mean pixel change, the mean
|Δs_k| of the other prototypes, and the reconstruction PSNR. Activation statistics (levels and
covariance) come from 300 test images. Writes benchmarks/inversion_edits.json (rows of the same
run, inversion, coupling and w are replaced, others kept).

`--inversions noise` is the diagnostic without an inversion: a fresh-noise sample under the
reference's s against one from the same noise under the edited s (its "reconstruction" is that
sample, so no PSNR): how far the generator follows the edit when no inverted latent pins the image.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch

from patronus.cli.common import Context, DataSource, load_pipeline
from patronus.edits import Edit, apply_edits, follow_correlations
from patronus.interpret.generation_metrics import psnr
from patronus.interpret.stats import activation_statistics, edit_levels
from patronus.pipeline import EditResult, PatronusPipeline


def fresh_noise_edit(
    pipe: PatronusPipeline, refs: torch.Tensor, edits: list[list[Edit]], levels: dict, w: float, coupling: str
) -> EditResult:
    """`pipe.edit` with a fresh latent (seed 0) in place of the inverted one."""
    s = pipe.encode(refs).s
    latent = pipe.noise((len(refs), *pipe.image_shape()), seed=0)
    sample = pipe.denoise(latent, s, 50)  # clipped x̂0, as sampling does
    requested = [apply_edits(s, e, levels) for e in edits]
    if coupling == "correlated":
        requested = [follow_correlations(s, r, [x.prototype for x in e], levels["cov"]) for r, e in zip(requested, edits)]
    images = torch.stack([pipe.decode_edited(latent, r, s, 50, guidance=w, clip=True) for r in requested])
    return EditResult(latent, s, sample, images, torch.stack(requested), 50, None)


def measure(
    run: str, num_images: int, guidance: list[float], inversions: list[str], couplings: list[str], pool: int = 300
) -> list[dict[str, Any]]:
    pipe = load_pipeline(run, "cpu")
    ctx = Context(pipe, run, Path(run), 0, DataSource(split="test"))
    x = ctx.images(max(pool, num_images))
    refs = x[:num_images]
    stats = activation_statistics(pipe.encode(x).s)
    levels = edit_levels(stats)
    prototypes = torch.tensor(stats["std"]).argsort(descending=True)[:4].tolist()
    rows = []
    edits = [[Edit(j, "set", "q99")] for j in prototypes]
    for inversion in inversions:
        for coupling in couplings:
            for w in guidance:
                t0 = time.perf_counter()
                if inversion == "noise":
                    res = fresh_noise_edit(pipe, refs, edits, levels, w, coupling)
                else:
                    res = pipe.edit(refs, edits, 50, levels=levels, guidance=w, inversion=inversion, coupling=coupling)
                s_rec = pipe.encode(res.reconstruction).s
                gains, off = [], []
                for k, j in enumerate(prototypes):
                    gap = levels["q99"][j] - s_rec[:, j]
                    ok = gap.abs() >= 0.1 * (levels["q99"][j] - levels["q01"][j])
                    s_edit = pipe.encode(res.images[k]).s
                    gains.append(float(((s_edit[:, j] - s_rec[:, j]) / gap)[ok].mean()))
                    off.append(float((s_edit - s_rec).abs().index_fill(1, torch.tensor([j]), 0).sum(1).mean() / (len(levels["sd"]) - 1)))
                scores = psnr(res.reconstruction, refs)
                rows.append(
                    {
                        "run": run,
                        "inversion": inversion,
                        "coupling": coupling,
                        "edit_guidance": w,
                        "prototypes": prototypes,
                        "gain_per_prototype": gains,
                        "gain_mean": sum(gains) / len(gains),
                        "pixel_change": float((res.images - res.reconstruction[None]).abs().mean()),
                        "off_target_mean": sum(off) / len(off),
                        "reconstruction_psnr_db": None if inversion == "noise" else sum(scores) / len(scores),
                        "seconds": time.perf_counter() - t0,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=["runs/mnist_cpu"])
    p.add_argument("--num_images", type=int, default=32)
    p.add_argument("--edit_guidance", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--inversions", nargs="+", choices=["ddim", "edit_friendly", "noise"], default=["ddim", "edit_friendly"])
    p.add_argument("--couplings", nargs="+", choices=["alone", "correlated"], default=["alone", "correlated"])
    p.add_argument("--out", default=str(Path(__file__).with_name("inversion_edits.json")))
    a = p.parse_args(argv)
    rows = [r for run in a.runs for r in measure(run, a.num_images, a.edit_guidance, a.inversions, a.couplings)]
    out = Path(a.out)
    key = lambda r: (r["run"], r["inversion"], r["coupling"], r["edit_guidance"])  # noqa: E731
    new = {key(r) for r in rows}
    kept = [r for r in json.loads(out.read_text()) if key(r) not in new] if out.exists() else []
    out.write_text(json.dumps(kept + rows, indent=1))
    print(f"wrote {a.out}")
    return rows


if __name__ == "__main__":
    main()
