"""`python -m patronus <analysis> --checkpoint RUN ...`: every analysis writes PNGs and a JSON of numbers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torchvision.io import write_png

from patronus.checkpoints import analysis_dir, load_model
from patronus.diffusion import ddim_sample
from patronus.interpret.attribution import add_attribution_args, run_attribution
from patronus.interpret.consistency import consistency_grid, prototype_consistency
from patronus.interpret.emergence import add_emergence_args, run_emergence
from patronus.interpret.figures import heatmap
from patronus.interpret.generation_metrics import feature_network, fid_kid, to_uint8, write_pngs
from patronus.interpret.information import add_information_args, run_information
from patronus.interpret.interpolate import extrapolate, interpolate, variations
from patronus.interpret.localise import edit_and_localise, edit_each_prototype, localisation_gallery
from patronus.interpret.quality import class_indicators, prototype_quality
from patronus.interpret.projection import nearest_patches, patch_gallery
from patronus.interpret.stats import cached_statistics
from patronus.models.prior import ActivationPrior
from patronus.sampling import encode_all, first_images, load_prior, prior_dir, psnr, save_rows, split_dataset, unconditional_samples


def _data(args: argparse.Namespace, model) -> Any:
    ds = split_dataset(args.checkpoint, model, args.dataset, args.data_root, args.split)
    if ds is None:
        raise SystemExit("error: no dataset: pass --dataset and --data-root (or a run directory that has config.yaml)")
    return ds


def cmd_stats(args, model, out: Path) -> dict:
    ds = _data(args, model)
    images = first_images(ds, args.num_images)
    stats = cached_statistics(model, images, analysis_dir(args.checkpoint) / "activation_stats.json", {**ds.source, "images": len(images)})
    return {"activation_stats": stats}


def cmd_project(args, model, out: Path) -> dict:
    ds = _data(args, model)
    images = first_images(ds, args.num_images)
    hits = nearest_patches(model, images.to(args.device), k=args.k)
    write_png(patch_gallery(images, hits), str(out / "projection.png"))
    return {"projection": [[vars(h) for h in row] for row in hits], "receptive_field": vars(model.encoder.receptive_field())}


def cmd_variations(args, model, out: Path) -> dict:
    refs = first_images(_data(args, model), args.num_images).to(args.device)
    imgs = variations(model, refs, args.n, args.steps, args.seed)
    save_rows([refs, *imgs], out / "variations.png")
    return {"n": args.n, "mean_pixel_std_across_variations": float(imgs.std(0).mean())}


def cmd_interpolate(args, model, out: Path) -> dict:
    ds = _data(args, model)
    a, b = (torch.stack([ds[i]["image"] for i in idx]).to(args.device) for idx in (args.a, args.b))
    path = interpolate(model, a, b, args.n, args.steps)  # (n, B, ...)
    save_rows(list(path.transpose(0, 1)), out / "interpolation.png")  # one row per pair
    return {"pairs": list(zip(args.a, args.b)), "endpoint_psnr_db": {"a": psnr(path[0], a), "b": psnr(path[-1], b)}}


def cmd_extrapolate(args, model, out: Path) -> dict:
    ds = _data(args, model)
    refs = first_images(ds, args.num_images).to(args.device)
    top = _stats(args, model, ds)["max"][args.prototype]
    values = torch.linspace(0, args.beyond * top, args.n).tolist()
    imgs, measured = extrapolate(model, refs, args.prototype, values, args.steps)
    save_rows(list(imgs.transpose(0, 1)), out / f"extrapolation_p{args.prototype}.png")
    return {"prototype": args.prototype, "values": values, "measured_mean": measured.mean(1).tolist(), "dataset_max": top}


def _stats(args, model, ds) -> dict:
    """The checkpoint's cached activation statistics (computed on 512 images of `ds` if absent)."""
    pool = first_images(ds, 512)
    return cached_statistics(model, pool, analysis_dir(args.checkpoint) / "activation_stats.json", {**ds.source, "images": len(pool)})


def _prototypes(args, model) -> list[int]:
    prototypes = args.prototypes if args.prototypes is not None else list(range(model.config.num_prototypes))
    bad = [j for j in prototypes if not 0 <= j < model.config.num_prototypes]
    if bad:
        raise SystemExit(f"error: --prototypes {bad}: the model has K={model.config.num_prototypes} prototypes")
    return prototypes


def cmd_localise(args, model, out: Path) -> dict:
    ds = _data(args, model)
    refs = first_images(ds, args.num_images).to(args.device)
    stats = _stats(args, model, ds)
    prototypes = _prototypes(args, model)
    found, plain, edited = edit_and_localise(model, refs, prototypes, torch.tensor(stats["max"]), args.steps, args.partial_steps)
    write_png(localisation_gallery(plain.cpu(), edited.cpu(), found), str(out / "localise.png"))
    return {"partial_steps": args.partial_steps, "steps": args.steps, "localisations": [vars(f) for f in found]}


def cmd_quality(args, model, out: Path) -> dict:
    """Paper §4.2 on held-out folds; class-only datasets get one 'is class c' attribute per class for TAD."""
    ds = _data(args, model)
    n = min(args.num_images, len(ds))
    s = encode_all(model, first_images(ds, n).to(args.device))
    attrs, names, labels = ds.attributes[:n], list(ds.attribute_names), ds.labels[:n]
    if not names and bool((labels >= 0).any()):
        attrs, names = class_indicators(labels, list(ds.classes))
    report = prototype_quality(s, attrs, names, labels, folds=args.folds, seed=args.seed)
    K = model.config.num_prototypes
    heatmap(report.auroc, xlabels=[str(j) for j in range(K)], ylabels=names, xlabel="prototype", ylabel="attribute",
            title="single-prototype AUROC (sign-free)", vmin=0.5, vmax=1.0, colorbar_label="AUROC",
            path=out / "auroc_matrix.png")
    return {"images": n, "attributes": names, **report.summary(), "auroc_matrix": report.auroc.tolist()}


def cmd_consistency(args, model, out: Path) -> dict:
    ds = _data(args, model)
    refs = first_images(ds, args.num_images).to(args.device)
    stats = _stats(args, model, ds)
    prototypes = _prototypes(args, model)
    outcome = edit_each_prototype(model, refs, prototypes, torch.tensor(stats["max"]), args.steps, args.partial_steps)
    scores = prototype_consistency(model, outcome)
    write_png(consistency_grid(outcome, model), str(out / "consistency.png"))
    valid = [c.consistency for c in scores if c.consistency == c.consistency]
    return {"images": len(refs), "steps": args.steps, "prototypes": [c.as_dict() for c in scores],
            "mean_consistency": sum(valid) / len(valid) if valid else float("nan")}


def cmd_fid(args, model, out: Path) -> dict:
    """Generate N images (conditional on test images' s, or from the trained prior), keep them as PNG, score."""
    from patronus.sampling import noise_like

    ds = _data(args, model)
    real = first_images(ds, args.num_images)
    if len(real) < args.num_images:
        print(f"note: the {ds.source['dataset']} {args.split} split has only {len(real)} images")
    source = "prior" if args.unconditional else "conditional"
    fake = []
    prior = load_prior(args.checkpoint).to(args.device) if args.unconditional else None
    for i in range(0, len(real), args.batch_size):
        chunk = real[i : i + args.batch_size].to(args.device)
        if prior is not None:
            imgs, _ = unconditional_samples(model, prior, len(chunk), args.steps, args.seed + i)
        else:  # s of a real image, fresh x_T: how well s pins down an image
            imgs = ddim_sample(model, noise_like(chunk, args.seed + i), model.encode(chunk), num_steps=args.steps)
        fake.append(to_uint8(imgs).cpu())
    fake_u8, real_u8 = torch.cat(fake), to_uint8(real)
    write_pngs(fake_u8, out / "generated")
    write_pngs(real_u8, out / "real")
    save_rows([fake_u8[:16].float() / 127.5 - 1], out / "generated_grid.png")
    reference = load_model(args.feature_checkpoint, args.device) if args.feature_checkpoint else model
    feature, extra = feature_network(args.features, reference, args.inception_weights, args.feature_weights)
    scores = fid_kid(real_u8, fake_u8, feature, extra)
    floor = first_images(ds, 2 * len(real))[len(real):]
    if len(floor) >= 2:  # the same metric between two sets of real images: what "perfect" scores at this N
        scores["real_vs_real"] = fid_kid(real_u8, to_uint8(floor), feature, extra)
    return {"source": source, "features": args.features, "feature_checkpoint": args.feature_checkpoint or args.checkpoint,
            "steps": args.steps, **scores, "generated_dir": str(out / "generated"), "real_dir": str(out / "real")}


def cmd_prior(args, model, out: Path) -> dict:
    """Train the activation prior on train-split activations, check it on held-out ones, decode samples."""
    train = encode_all(model, first_images(_data(args, model), args.num_images).to(args.device))
    args.split = "test"
    held_out = encode_all(model, first_images(_data(args, model), 1000).to(args.device))
    prior = ActivationPrior(num_prototypes=model.config.num_prototypes)
    losses = prior.fit(train, steps=args.prior_steps, seed=args.seed)
    prior.save_pretrained(prior_dir(args.checkpoint), safe_serialization=True)
    draws = prior.sample(len(held_out), steps=args.steps, seed=args.seed)
    sd = held_out.std(0).clamp_min(1e-8)
    images, _ = unconditional_samples(model, prior, 16, args.steps, args.seed)
    save_rows(list(images.view(2, 8, *images.shape[1:])), out / "prior_samples.png")
    return {
        "losses_every_100_steps": losses,
        "held_out_images": len(held_out),
        "max_mean_error_in_std": float(((draws.mean(0) - held_out.mean(0)).abs() / sd).max()),
        "std_ratio_range": [float((draws.std(0) / sd).min()), float((draws.std(0) / sd).max())],
        "mean_abs_correlation_error": float((torch.corrcoef(draws.T) - torch.corrcoef(held_out.T)).abs().mean()),
        "saved_to": str(prior_dir(args.checkpoint)),
    }


def cmd_emergence(args, model, out: Path) -> dict:
    ds = _data(args, model)
    refs = first_images(ds, args.num_images).to(args.device)
    return run_emergence(args, model, refs, torch.tensor(_stats(args, model, ds)["max"]), out)


def cmd_information(args, model, out: Path) -> dict:
    ds = _data(args, model)
    refs = first_images(ds, args.num_images).to(args.device)
    args.prototypes = _prototypes(args, model)
    stats = _stats(args, model, ds) if args.baseline == "median" else None  # "zero" needs no statistics
    return run_information(args, model, refs, stats, out)


def cmd_attribution(args, model, out: Path) -> dict:
    """Saliency needs gradients: `run_attribution` re-enables them inside main's no_grad."""
    ds = _data(args, model)
    refs = first_images(ds, args.num_images).to(args.device)
    return run_attribution(args, model, refs, _stats(args, model, ds), out)


def cmd_shortcuts(args, model, out: Path) -> dict:
    """The shortcut report: ranked prototypes, causal checks, where/when, counterfactuals, mitigation."""
    from patronus.interpret.report import build_report, log_to_wandb, write_markdown

    ds = _data(args, model)
    summary = build_report(model, ds, _stats(args, model, ds), out, args)
    summary["report"] = str(write_markdown(summary, out, f"{args.checkpoint} on {ds.source['dataset']} {args.split}"))
    if not args.no_wandb:
        summary["wandb_dir"] = log_to_wandb(summary, out, "patronus", analysis_dir(args.checkpoint))
    return summary


COMMANDS: dict[str, tuple[Callable[..., dict], str]] = {
    "stats": (cmd_stats, "per-prototype activation statistics over a split (cached; the 'max' of edits)"),
    "project": (cmd_project, "top-k real training patches per prototype with receptive-field boxes"),
    "variations": (cmd_variations, "same s, new x_T: what the prototypes fix and what they leave free"),
    "interpolate": (cmd_interpolate, "invert two images, lerp s and slerp x_T between them"),
    "extrapolate": (cmd_extrapolate, "sweep one prototype's activation from 0 to beyond its dataset max"),
    "prior": (cmd_prior, "train the diffusion prior over activations (unconditional generation) and decode samples"),
    "localise": (cmd_localise, "raise each prototype to its max, decode, box where it fires (optionally from partial noise)"),
    "consistency": (cmd_consistency, "edit each prototype into many images: how consistent are place and patch (one score each)"),
    "quality": (cmd_quality, "k-fold linear-probe AUROC/accuracy, TAD and attributes captured, on held-out folds"),
    "emergence": (cmd_emergence, "when each prototype's concept appears while decoding: prototype × timestep heatmaps"),
    "information": (cmd_information, "where and when each prototype informs the denoiser (nats per pixel / timestep), PID of top pairs"),
    "attribution": (cmd_attribution, "saliency of x_t for one prototype at one timestep, deletion/insertion faithfulness vs random"),
    "fid": (cmd_fid, "FID/KID offline with a local feature network; generated and real images kept as PNG"),
    "shortcuts": (cmd_shortcuts, "shortcut report: which prototype carries a confounder, where, when, does editing it flip predictions"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m patronus", description="Patronus analyses: PNG figures + JSON numbers.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        c = sub.add_parser(name, help=help_text, description=help_text)
        c.add_argument("--checkpoint", required=True, help="run directory, exported model directory or .ckpt")
        c.add_argument("--out", default=None, help="output folder (default RUN/analysis/<command>)")
        c.add_argument("--dataset")
        c.add_argument("--data-root")
        c.add_argument("--split", default="train" if name in ("project", "prior") else "test")
        c.add_argument("--num-images", type=int,
                       default={"stats": 2000, "project": 2000, "prior": 5000, "quality": 10000, "fid": 500, "shortcuts": 2000}.get(name, 8))
        c.add_argument("--steps", type=int, default=25 if name == "shortcuts" else 50, help="DDIM steps")
        c.add_argument("--seed", type=int, default=0)
        c.add_argument("--device", default=None)
        if name == "project":
            c.add_argument("--k", type=int, default=6, help="patches per prototype")
        if name in ("variations", "interpolate", "extrapolate"):
            c.add_argument("--n", type=int, default=6, help="images per row")
        if name == "interpolate":
            c.add_argument("--a", type=int, nargs="+", default=[0, 1], help="dataset indices of the start images")
            c.add_argument("--b", type=int, nargs="+", default=[2, 3], help="dataset indices of the end images")
        if name == "prior":
            c.add_argument("--prior-steps", type=int, default=3000, help="training steps of the prior")
        if name in ("localise", "consistency"):
            c.add_argument("--prototypes", type=int, nargs="+", help="default: all")
            c.add_argument("--partial-steps", type=int, help="invert only this many DDIM steps and edit from there")
        if name == "emergence":
            add_emergence_args(c)
        if name == "information":
            add_information_args(c)
        if name == "attribution":
            add_attribution_args(c)
        if name == "shortcuts":
            from patronus.interpret.report import add_report_args

            add_report_args(c)
        if name == "quality":
            c.add_argument("--folds", type=int, default=5)
        if name == "fid":
            c.add_argument("--features", default="encoder", help="encoder | inception | timm:<name> (see docs)")
            c.add_argument("--feature-checkpoint", help="score in this run's encoder space (default: the checkpoint's own)")
            c.add_argument("--inception-weights", help="local pt_inception-2015-12-05 weights file for --features inception")
            c.add_argument("--feature-weights", help="local weights file for --features timm:<name>")
            c.add_argument("--unconditional", action="store_true", help="generate from the trained activation prior")
            c.add_argument("--batch-size", type=int, default=100)
        if name == "extrapolate":
            c.add_argument("--prototype", type=int, required=True)
            c.add_argument("--beyond", type=float, default=1.5, help="sweep up to this multiple of the dataset max")
    return p


@torch.no_grad()
def main(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.checkpoint, args.device)
    if args.command == "extrapolate" and not 0 <= args.prototype < model.config.num_prototypes:
        raise SystemExit(f"error: --prototype {args.prototype}: the model has K={model.config.num_prototypes} prototypes")
    out = Path(args.out) if args.out else analysis_dir(args.checkpoint) / args.command
    out.mkdir(parents=True, exist_ok=True)
    result = COMMANDS[args.command][0](args, model, out)
    (out / f"{args.command}.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result
