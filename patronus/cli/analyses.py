"""`python -m patronus <command> --checkpoint RUN ...`: every analysis writes PNGs and a JSON of numbers.

Each command is a function `(ctx, typed options) -> dict`: jsonargparse builds its options
(types, defaults, help) from the signature and docstring, `ctx` carries the pipeline, the
data and the output folder. The analyses themselves are pure functions in `patronus.interpret`;
figures come from `patronus.plots`. `python -m patronus <command> --help` lists the options.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any, Optional, Union

import torch
from jsonargparse import ArgumentParser

from patronus import __version__, plots, runs
from patronus.cli.common import (
    STATS_IMAGES,
    Context,
    add_common_arguments,
    check_positive,
    open_context,
    report_user_errors,
    wants_debug,
    write_json,
)
from patronus.cli.explain import cmd_attribution, cmd_information
from patronus.cli.faithfulness import cmd_faithfulness
from patronus.cli.shortcuts import cmd_shortcuts
from patronus.cli.wandb_runs import log_analysis, wants_wandb
from patronus.edits import most_variable_prototypes
from patronus.interpret.consistency import prototype_consistency
from patronus.interpret.emergence import edit_emergence, plain_settling
from patronus.interpret.generation_metrics import feature_network, fid_kid, generate_like, psnr, write_pngs
from patronus.interpret.interpolate import extrapolate, interpolate, variations
from patronus.interpret.localise import edit_and_localise, edit_each_prototype
from patronus.interpret.prior_check import prior_check
from patronus.interpret.projection import nearest_patches
from patronus.interpret.quality import class_indicators, prototype_quality
from patronus.interpret.stats import edit_levels
from patronus.torch_utils import to_uint8
from patronus.training.prior import train_activation_prior

Prototypes = Union[list[int], int, None]


def cmd_stats(ctx: Context, num_images: int = STATS_IMAGES) -> dict:
    """Per-prototype activation statistics over a split (cached; the q99/q01 of edits).

    Args:
        num_images: images the statistics are computed on.
    """
    stats = ctx.statistics(num_images)
    return {"activation_stats": {k: v for k, v in stats.items() if k != "activations"}}  # the numbers, not the images' s


def cmd_project(ctx: Context, num_images: int = 2000, k: int = 6) -> dict:
    """Top-k real training patches per prototype with receptive-field boxes (ProtoPNet projection).

    Args:
        num_images: images searched.
        k: patches per prototype.
    """
    check_positive(k=k)
    images = ctx.images(num_images)
    hits = nearest_patches(ctx.pipe, images, k=k)
    plots.save_png(plots.patch_gallery(images, hits), ctx.out / "projection.png")
    return {"projection": [[vars(h) for h in row] for row in hits], "receptive_field": vars(ctx.pipe.model.encoder.receptive_field())}


def cmd_variations(ctx: Context, num_images: int = 8, n: int = 6, steps: int = 50) -> dict:
    """Same s, new x_T: what the prototypes fix and what they leave free.

    Args:
        num_images: reference images.
        n: variations per reference.
        steps: DDIM steps.
    """
    check_positive(n=n, steps=steps)
    refs = ctx.images(num_images)
    imgs = variations(ctx.pipe, refs, n, steps, ctx.seed)
    plots.save_rows([refs, *imgs], ctx.out / "variations.png")
    return {"n": n, "mean_pixel_std_across_variations": float(imgs.std(0).mean())}


def cmd_interpolate(ctx: Context, a: list[int] = [0, 1], b: list[int] = [2, 3], n: int = 6, steps: int = 50) -> dict:  # noqa: B006
    """Invert two images, lerp s and slerp x_T between them.

    Args:
        a: dataset indices of the start images.
        b: dataset indices of the end images (as many as `a`).
        n: images per row.
        steps: DDIM steps.
    """
    check_positive(n=n, steps=steps)
    ds = ctx.dataset()
    if len(a) != len(b):
        raise ValueError(f"a has {len(a)} indices and b has {len(b)}; give one end image per start image")
    bad = [i for i in [*a, *b] if not 0 <= i < len(ds)]
    if bad:
        raise ValueError(f"a/b indices {bad}: out of range for a split with {len(ds)} images")
    x_a, x_b = (torch.stack([ds[i]["image"] for i in idx]) for idx in (a, b))
    path = interpolate(ctx.pipe, x_a, x_b, n, steps)  # (n, B, ...)
    plots.save_rows(list(path.transpose(0, 1)), ctx.out / "interpolation.png")  # one row per pair
    return {"pairs": list(zip(a, b)), "endpoint_psnr_db": {"a": psnr(path[0], x_a), "b": psnr(path[-1], x_b)}}


def cmd_extrapolate(ctx: Context, prototype: int, num_images: int = 8, n: int = 6, beyond: float = 1.5, steps: int = 50) -> dict:
    """Sweep one prototype's activation from 0 to beyond its dataset q99, from the same inverted x_T.

    Args:
        prototype: the prototype to sweep.
        num_images: reference images.
        n: values in the sweep.
        beyond: sweep up to this multiple of the dataset q99.
        steps: DDIM steps.
    """
    ctx.check_prototypes([prototype], "prototype")
    check_positive(n=n, steps=steps)
    refs = ctx.images(num_images)
    top = ctx.statistics()["q99"][prototype]
    values = torch.linspace(0, beyond * top, n).tolist()
    imgs, measured = extrapolate(ctx.pipe, refs, prototype, values, steps)
    plots.save_rows(list(imgs.transpose(0, 1)), ctx.out / f"extrapolation_p{prototype}.png")
    return {"prototype": prototype, "values": values, "measured_mean": measured.mean(1).tolist(), "dataset_q99": top}


def cmd_prior(ctx: Context, num_images: int = 5000, prior_steps: int = 3000, steps: int = 50) -> dict:
    """Train the diffusion prior over activations (unconditional generation) and decode samples.

    Args:
        num_images: training images whose activations the prior learns.
        prior_steps: training steps of the prior.
        steps: DDIM steps of prior and image sampling.
    """
    check_positive(prior_steps=prior_steps, steps=steps)
    pipe = ctx.pipe
    prior, losses = train_activation_prior(pipe, ctx.images(num_images), prior_steps, ctx.seed)  # pipe.generate now uses it
    runs.save_prior(ctx.checkpoint, prior, pipe.model)
    check = prior_check(pipe, ctx.images(1000, split="validation"), steps, ctx.seed)
    images, _ = pipe.generate(16, steps, ctx.seed)
    plots.save_rows(list(images.view(2, 8, *images.shape[1:])), ctx.out / "prior_samples.png")
    return {"losses_every_100_steps": losses, **check.as_dict(), "saved_to": str(runs.prior_dir(ctx.checkpoint))}


def cmd_localise(
    ctx: Context, num_images: int = 8, prototypes: Prototypes = None, inverted_steps: Optional[int] = None, steps: int = 50
) -> dict:
    """Raise each prototype to its q99, decode, box where it fires (optionally from partial noise).

    Args:
        num_images: images each prototype is raised in.
        prototypes: prototypes to raise, e.g. [3,7] (default: all).
        inverted_steps: invert only this many of the DDIM steps and edit from there (default: all).
        steps: DDIM steps.
    """
    check_positive(steps=steps)
    refs = ctx.images(num_images)
    prototypes = ctx.check_prototypes(prototypes) or list(range(ctx.pipe.num_prototypes))
    levels = edit_levels(ctx.statistics())
    found, plain, edited = edit_and_localise(ctx.pipe, refs, prototypes, levels["q99"], steps, inverted_steps)
    plots.save_png(plots.localisation_gallery(plain.cpu(), edited.cpu(), found), ctx.out / "localise.png")
    return {"inverted_steps": inverted_steps, "steps": steps, "localisations": [vars(f) for f in found]}


def cmd_consistency(
    ctx: Context, num_images: int = 8, prototypes: Prototypes = None, inverted_steps: Optional[int] = None, steps: int = 50
) -> dict:
    """Edit each prototype into many images: how consistent are position and patch (one score each).

    Args:
        num_images: images each prototype is raised in.
        prototypes: prototypes to raise, e.g. [3,7] (default: all).
        inverted_steps: invert only this many of the DDIM steps and edit from there (default: all).
        steps: DDIM steps.
    """
    check_positive(steps=steps)
    refs = ctx.images(num_images)
    prototypes = ctx.check_prototypes(prototypes) or list(range(ctx.pipe.num_prototypes))
    outcome = edit_each_prototype(ctx.pipe, refs, prototypes, edit_levels(ctx.statistics())["q99"], steps, inverted_steps)
    scores = prototype_consistency(ctx.pipe, outcome)
    plots.save_png(plots.consistency_grid(outcome, ctx.pipe.model.encoder.receptive_field()), ctx.out / "consistency.png")
    valid = [c.consistency for c in scores if c.consistency == c.consistency]
    return {
        "images": len(refs),
        "steps": steps,
        "prototypes": [c.as_dict() for c in scores],
        "mean_consistency": sum(valid) / len(valid) if valid else float("nan"),
    }


def cmd_quality(ctx: Context, num_images: int = 10000, folds: int = 5) -> dict:
    """k-fold linear-probe AUROC/accuracy, TAD and attributes captured, on held-out folds (Patronus §4.2).

    Class-only datasets get one 'is class c' attribute per class for TAD.

    Args:
        num_images: images encoded.
        folds: cross-validation folds.
    """
    check_positive(folds=folds)
    ds = ctx.dataset()
    n = min(num_images, len(ds))
    s = ctx.pipe.encode(ctx.images(n)).s.cpu()
    attrs, names, labels = ds.attributes[:n], list(ds.attribute_names), ds.labels[:n]
    if not names and bool((labels >= 0).any()):
        attrs, names = class_indicators(labels, list(ds.classes))
    report = prototype_quality(s, attrs, names, labels, folds=folds, seed=ctx.seed)
    K = ctx.pipe.num_prototypes
    plots.heatmap(
        report.auroc,
        xlabels=[str(j) for j in range(K)],
        ylabels=names,
        xlabel="prototype",
        ylabel="attribute",
        title="single-prototype AUROC (sign-free)",
        vmin=0.5,
        vmax=1.0,
        colorbar_label="AUROC",
        path=ctx.out / "auroc_matrix.png",
    )
    return {"images": n, "attributes": names, **report.summary(), "auroc_matrix": report.auroc.tolist()}


def cmd_fid(
    ctx: Context,
    num_images: int = 500,
    steps: int = 50,
    features: str = "encoder",
    feature_checkpoint: Optional[str] = None,
    inception_weights: Optional[str] = None,
    feature_weights: Optional[str] = None,
    unconditional: bool = False,
    batch_size: int = 100,
) -> dict:
    """FID/KID offline with a local feature network; generated and real images kept as PNG.

    Args:
        num_images: real and generated images.
        steps: DDIM steps.
        features: encoder | inception | timm:<name> (nothing is downloaded).
        feature_checkpoint: score in this run's encoder space (default: the checkpoint's own).
        inception_weights: local pt_inception-2015-12-05 weights file for `features=inception`.
        feature_weights: local weights file for `features=timm:<name>`.
        unconditional: generate from the trained activation prior instead of test images' s.
        batch_size: images generated per batch.
    """
    check_positive(steps=steps, batch_size=batch_size)
    pipe = ctx.pipe
    reference = runs.load_model(feature_checkpoint, pipe.device) if feature_checkpoint else pipe.model
    feature, extra = feature_network(features, reference, inception_weights, feature_weights)  # checked before generating
    if unconditional and pipe.prior is None:
        raise FileNotFoundError(f"{runs.prior_dir(ctx.checkpoint)}: no trained activation prior; run `python -m patronus prior` first")
    real = ctx.images(num_images)
    if len(real) < num_images:
        print(f"note: the {ctx.dataset().source['dataset']} split has only {len(real)} images")
    fake_u8, real_u8 = generate_like(pipe, real, steps, ctx.seed, batch_size, unconditional), to_uint8(real)
    write_pngs(fake_u8, ctx.out / "generated")
    write_pngs(real_u8, ctx.out / "real")
    plots.save_rows([fake_u8[:16].float() / 127.5 - 1], ctx.out / "generated_grid.png")
    scores = fid_kid(real_u8, fake_u8, feature, extra)
    floor = ctx.images(2 * len(real))[len(real) :]
    if len(floor) >= 2:  # the same metric between two sets of real images: what "perfect" scores at this N
        scores["real_vs_real"] = fid_kid(real_u8, to_uint8(floor), feature, extra)
    return {
        "source": "prior" if unconditional else "conditional",
        "features": features,
        "feature_checkpoint": feature_checkpoint or ctx.checkpoint,
        "steps": steps,
        **scores,
        "generated_dir": str(ctx.out / "generated"),
        "real_dir": str(ctx.out / "real"),
    }


def _times(times: torch.Tensor) -> list[Optional[float]]:
    return [None if t != t else t for t in times.tolist()]


def cmd_emergence(ctx: Context, num_images: int = 8, prototypes: Prototypes = None, every: int = 1, steps: int = 50) -> dict:
    """When each prototype's concept appears while decoding: prototype × timestep heatmaps.

    Args:
        num_images: images each prototype is raised in.
        prototypes: prototypes to raise, e.g. [3,7] (default: the 8 most variable over the images).
        every: re-encode x̂0 every k-th DDIM step (the last always).
        steps: DDIM steps.
    """
    from safetensors.torch import save_file

    check_positive(every=every, steps=steps)
    pipe = ctx.pipe
    refs = ctx.images(num_images)
    K = pipe.num_prototypes
    prototypes = ctx.check_prototypes(prototypes) or most_variable_prototypes(pipe.encode(refs).s, min(8, K))
    res = edit_emergence(pipe, refs, prototypes, edit_levels(ctx.statistics())["q99"], steps, every)
    names = [f"p{j}" for j in prototypes]
    out = ctx.out
    plots.emergence_heatmap(
        res.effect.T, res.timesteps, "edit effect: s_J(x̂0(t) | s_J = max) − s_J(x̂0(t) | plain)", out / "emergence_heatmap.png", names
    )
    plots.emergence_curve_plot(
        res.mean,
        res.std,
        res.timesteps,
        [f"p{j} → {float(v):.3g}" for j, v in zip(prototypes, res.s_target)],
        out / "emergence_curves.png",
        title="s_J(x̂0(t) | s_J = max) − s_J(x0), mean ± std",
    )
    plain_mean, plain_std, settle = plain_settling(res)  # (S, K), (S, K), (K,)
    plots.emergence_heatmap(
        plain_mean.T, res.timesteps, "plain reconstruction: s(x̂0(t)) − s(x0)", out / "plain_heatmap.png", [f"p{j}" for j in range(K)]
    )
    tensors = {
        "timesteps": res.timesteps,
        "prototypes": torch.tensor(prototypes, dtype=torch.long),
        "s_ref": res.s_ref,
        "s_target": res.s_target,
        "plain": res.plain,
        "edited": res.edited,
        "mean": res.mean,
        "std": res.std,
        "plain_mean": res.plain_mean,
        "plain_std": res.plain_std,
        "times": res.times,
        "effect_times": res.effect_times,
        "plain_mean_all": plain_mean,
        "plain_std_all": plain_std,
        "plain_settle_times": settle,
    }
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / "emergence.safetensors"))
    return {
        "images": len(refs),
        "steps": steps,
        "every": every,
        "prototypes": list(prototypes),
        "timesteps": res.timesteps.tolist(),
        "emergence_time": dict(zip(map(str, prototypes), _times(res.times))),
        "effect_emergence_time": dict(zip(map(str, prototypes), _times(res.effect_times))),
        "final_rise": dict(zip(map(str, prototypes), res.mean[-1].tolist())),
        "plain_final_difference": dict(zip(map(str, prototypes), res.plain_mean[-1].tolist())),
        "mean_curves": {str(j): res.mean[:, p].tolist() for p, j in enumerate(prototypes)},
        "effect_curves": {str(j): res.effect[:, p].tolist() for p, j in enumerate(prototypes)},
        "plain_settle_time": _times(settle),
    }


# name -> (command, default split of its data)
COMMANDS: dict[str, tuple[Callable[..., dict], str]] = {
    "stats": (cmd_stats, "validation"),
    "project": (cmd_project, "training"),
    "variations": (cmd_variations, "validation"),
    "interpolate": (cmd_interpolate, "validation"),
    "extrapolate": (cmd_extrapolate, "validation"),
    "prior": (cmd_prior, "training"),
    "localise": (cmd_localise, "validation"),
    "consistency": (cmd_consistency, "validation"),
    "quality": (cmd_quality, "validation"),
    "emergence": (cmd_emergence, "validation"),
    "information": (cmd_information, "validation"),
    "attribution": (cmd_attribution, "validation"),
    "fid": (cmd_fid, "validation"),
    "shortcuts": (cmd_shortcuts, "validation"),
    "faithfulness": (cmd_faithfulness, "validation"),
}

# Commands that need no checkpoint: name -> module with build_parser() and main(argv) (imported when used).
TOOLS: dict[str, str] = {"prepare": "patronus.cli.prepare"}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m patronus",
        description=(
            "Patronus analyses: PNG figures + JSON numbers. Training: `python train.py` (patronus-train); "
            "sampling and editing: `python sample.py` (patronus-sample)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"patronus {__version__}")
    sub = parser.add_subcommands(dest="command")
    for name, (fn, _) in COMMANDS.items():
        summary = (fn.__doc__ or "").strip().splitlines()[0]
        p = ArgumentParser(description=summary)
        add_common_arguments(p)
        p.add_function_arguments(fn, skip={"ctx"}, fail_untyped=True)
        sub.add_subcommand(name, p, help=summary)
    for name, module in TOOLS.items():
        p = importlib.import_module(module).build_parser()
        sub.add_subcommand(name, p, help=p.description)
    return parser


def run_command(name: str, options: dict[str, Any]) -> dict:
    """Run analysis `name` with parsed options; writes RUN/analysis/<name>/<name>.json (or --out)."""
    fn, default_split = COMMANDS[name]
    ctx = open_context(options, lambda checkpoint: runs.analysis_dir(checkpoint) / name, default_split)
    result = fn(ctx, **options)
    write_json(result, ctx.out / f"{name}.json")
    if name != "shortcuts" and wants_wandb(ctx.wandb, ctx.checkpoint):  # the report logs its own tables
        result["wandb_dir"] = log_analysis(ctx.checkpoint, name, result, ctx.out)
    print(f"wrote {ctx.out}")
    return result


def main(argv: Optional[list[str]] = None) -> dict:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in TOOLS:
        return importlib.import_module(TOOLS[args[0]]).main(args[1:])
    debug = wants_debug(argv)
    cfg = build_parser().parse_args(argv)
    name = cfg.command
    return report_user_errors(lambda: run_command(name, cfg[name].as_dict()), debug)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
