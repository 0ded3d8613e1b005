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
`--couplings neighbours` borrows the other prototypes from the real images nearest the edit (as the
CLI's `--coupling neighbours`; `neighbours128`: the 128 nearest). `--couplings prior0.6` completes
the correlated edit with the activation prior (fitted here on 4,000 training images): does an s more
like a real image's get followed further? `--couplings real` asks for a real training image's s
instead (the one nearest the reference among those whose s_J reaches q99), the gain read against its
s_J: how far the generator follows an s no edit made up.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch

from patronus.cli.common import Context, DataSource, load_pipeline
from patronus.edits import NEIGHBOURS, Edit, apply_edits, couple
from patronus.interpret.generation_metrics import psnr
from patronus.interpret.stats import activation_statistics, edit_levels
from patronus.models.prior import ActivationPrior
from patronus.pipeline import EditResult, PatronusPipeline
from patronus.schedulers import default_ddim, scheduler_for
from patronus.training.prior import train_activation_prior


def prior_coupled(prior: ActivationPrior, s_edit: torch.Tensor, edited: list[int], strength: float, steps: int = 50) -> torch.Tensor:
    """The other prototypes drawn from the activation prior given the edited ones: SDEdit in the
    prior's space from `s_edit` (noised to `strength` of the schedule; 1 = from pure noise), the
    edited coordinates replaced by their noised targets after every step (RePaint-style)."""
    z_edit = prior.standardise(s_edit)
    sched = scheduler_for(default_ddim(prior.scheduler().config).config, "ddim", steps)
    ts = sched.timesteps[int(round((1 - strength) * steps)) :]
    noise = torch.randn(z_edit.shape, generator=torch.Generator().manual_seed(0))
    z = sched.add_noise(z_edit, noise, ts[:1].expand(len(z_edit))) if strength < 1 else noise.clone()
    for i, t in enumerate(ts):
        z = sched.step(prior(z, t.expand(len(z))), t, z).prev_sample
        known = sched.add_noise(z_edit, noise, ts[i + 1].expand(len(z))) if i + 1 < len(ts) else z_edit
        z[:, edited] = known[:, edited]
    return prior.to_activations(z)


def nearest_real(s: torch.Tensor, bank: torch.Tensor, j: int, level: torch.Tensor) -> torch.Tensor:
    """For each row of s, the s of the real image in `bank` (N, K) with s_J ≥ `level` that is nearest
    to it in the other prototypes (standardised): an edit toward an s that a real image has."""
    cand = bank[bank[:, j] >= level]
    scale = bank.std(0).clamp_min(1e-8)
    d = torch.cdist((s / scale).index_fill(1, torch.tensor([j]), 0), (cand / scale).index_fill(1, torch.tensor([j]), 0))
    return cand[d.argmin(1)]


def requested_activations(
    s: torch.Tensor, edits: list[list[Edit]], levels: dict, coupling: str, prior: Optional[ActivationPrior], bank: Optional[torch.Tensor]
) -> list[torch.Tensor]:
    """The edited s of each edit: `alone`, `correlated`, `neighboursK` (`follow_neighbours` with K
    neighbours), `priorF` (the correlated edit completed by the prior at strength F), or `real`
    (`nearest_real` at the edit's level: no edit s at all, a real image's)."""
    if coupling == "real":
        return [nearest_real(s, bank, e[0].prototype, levels[str(e[0].value)][e[0].prototype]) for e in edits]
    k = NEIGHBOURS
    if coupling.startswith("neighbours"):
        coupling, k = "neighbours", int(coupling.removeprefix("neighbours") or NEIGHBOURS)
    strength = float(coupling.removeprefix("prior")) if coupling.startswith("prior") else None
    base = "correlated" if strength is not None else coupling  # the prior completes a correlated edit
    requested = [couple(s, apply_edits(s, e, levels), [x.prototype for x in e], base, levels, k) for e in edits]
    if strength is not None:
        requested = [prior_coupled(prior, r, [x.prototype for x in e], strength) for r, e in zip(requested, edits)]
    return requested


@torch.no_grad()
def edit_images(
    pipe: PatronusPipeline,
    refs: torch.Tensor,
    edits: list[list[Edit]],
    levels: dict,
    w: float,
    inversion: str,
    coupling: str,
    prior: Optional[ActivationPrior] = None,
    bank: Optional[torch.Tensor] = None,
) -> EditResult:
    """`pipe.edit`, or a variant of it: `inversion="noise"` decodes from a fresh latent (seed 0)
    instead of the inverted one, against a sample from it under the references' s; a `prior…`
    coupling asks for the prior-completed s, `real` for a real image's (DDIM inversion)."""
    if inversion != "noise" and coupling in ("alone", "correlated", "neighbours"):
        return pipe.edit(refs, edits, 50, levels=levels, guidance=w, inversion=inversion, coupling=coupling)
    if inversion not in ("noise", "ddim"):
        raise ValueError(f"coupling={coupling!r} is measured with the ddim inversion or from noise, not {inversion!r}")
    s = pipe.encode(refs).s
    clip = inversion == "noise"  # a fresh latent is sampled as `sample` does; an inverted one reproduces its image
    latent = pipe.noise((len(refs), *pipe.image_shape()), seed=0) if clip else pipe.invert(refs, s, 50)
    base = pipe.denoise(latent, s, 50, clip=clip)
    requested = requested_activations(s, edits, levels, coupling, prior, bank)
    images = torch.stack([pipe.decode_edited(latent, r, s, 50, guidance=w, clip=clip) for r in requested])
    return EditResult(latent, s, base, images, torch.stack(requested), 50, None)


def measure(
    run: str, num_images: int, guidance: list[float], inversions: list[str], couplings: list[str], pool: int = 300
) -> list[dict[str, Any]]:
    pipe = load_pipeline(run, "cpu")
    ctx = Context(pipe, run, Path(run), 0, DataSource(split="test"))
    x = ctx.images(max(pool, num_images))
    refs = x[:num_images]
    stats = activation_statistics(pipe.encode(x).s)
    levels = edit_levels(stats)
    # neighbours edits average the activations the CLI's statistics hold (its 2,000 validation images)
    levels["activations"] = edit_levels(Context(pipe, run, Path(run), 0, DataSource()).statistics())["activations"]
    prototypes = torch.tensor(stats["std"]).argsort(descending=True)[:4].tolist()
    prior = bank = None
    if any(c.startswith("prior") or c == "real" for c in couplings):
        train = Context(pipe, run, Path(run), 0, DataSource(split="training")).images(4000)
        bank = pipe.encode(train).s
        if any(c.startswith("prior") for c in couplings):  # fitted on the run's training images, as `python -m patronus prior`
            prior, _ = train_activation_prior(pipe, train, steps=3000)
    rows = []
    edits = [[Edit(j, "set", "q99")] for j in prototypes]
    for inversion in inversions:
        for coupling in couplings:
            for w in guidance:
                t0 = time.perf_counter()
                res = edit_images(pipe, refs, edits, levels, w, inversion, coupling, prior, bank)
                s_rec = pipe.encode(res.reconstruction).s
                gains, off = [], []
                for k, j in enumerate(prototypes):
                    gap = res.requested[k][:, j] - s_rec[:, j]  # q99, or the real image's s_J
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
    p.add_argument(
        "--couplings",
        nargs="+",
        default=["alone", "correlated"],
        help="alone, correlated, neighbours (as the CLI: 32 of its statistics' activations), neighboursK (K of them), "
        "priorF (F: the prior's strength, e.g. prior0.6) or real",
    )
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
