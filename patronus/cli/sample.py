"""`sample.py`: conditional samples, DDIM inversion + reconstruction, prototype-guided edits -> PNG + JSON."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from jsonargparse import ArgumentParser

from patronus import plots
from patronus.cli.common import (
    Context,
    add_common_arguments,
    check_positive,
    open_context,
    report_user_errors,
    wants_debug,
    write_json,
)
from patronus.cli.wandb_runs import log_analysis, wants_wandb
from patronus.data.images import Intensity, read_image
from patronus.edits import Edit, parse_edit
from patronus.interpret.generation_metrics import psnr
from patronus.interpret.stats import activation_statistics, edit_levels
from patronus.runs import CONFIG_FILE, home_of, resolve_checkpoint, run_config

EDIT_GUIDANCE = 2.0
DEFAULT_OUT = "outputs/sample"
DEFAULT_RUN = Path("runs/mnist_cpu")  # what `python train.py` alone trains


def image_intensity(ctx: Context) -> Intensity:
    """How reference image files are read: as the run read its data (`data.options` bit_depth / invert
    of its config.yaml, or this command's --data.options), so a 12-bit X-ray in a 16-bit PNG spans
    [-1, 1] as in training instead of coming out 16x too dark."""
    if ctx.data.options is not None:
        options, where = ctx.data.options, "--data.options"
    else:
        options = (run_config(ctx.checkpoint).get("data") or {}).get("options") or {}
        where = f"{home_of(ctx.checkpoint) / CONFIG_FILE} data.options"
    try:
        return Intensity(options.get("bit_depth"), options.get("invert", False))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def references(ctx: Context, images: Optional[list[str]], resize: bool, indices: Optional[list[int]]) -> tuple[torch.Tensor, list[str]]:
    """Reference images (B, C, H, W) and their names: image files, or dataset rows by index (default 0..7)."""
    c = ctx.pipe.model.config
    if images:
        intensity = image_intensity(ctx)
        refs = [
            read_image(
                p, c.in_channels, size=None if resize else c.image_size, resize_to=c.image_size if resize else None, intensity=intensity
            )
            for p in images
        ]
        return torch.stack(refs), [str(p) for p in images]
    ds = ctx.dataset()
    idx = indices if indices is not None else list(range(min(8, len(ds))))
    bad = [i for i in idx if not 0 <= i < len(ds)]
    if bad:
        raise ValueError(f"indices {bad}: out of range for {ds.source['dataset']} {ds.source['split']} with {len(ds)} images")
    split = ds.source["published_split"] + (f"[holdout {ds.source['holdout']}]" if "holdout" in ds.source else "")
    return torch.stack([ds[i]["image"] for i in idx]), [f"{ds.source['dataset']}:{split}:{i}" for i in idx]


def sample(
    ctx: Context,
    images: Optional[list[str]] = None,
    resize: bool = False,
    indices: Optional[list[int]] = None,
    sampler: Literal["ddim", "ddpm"] = "ddim",
    steps: int = 50,
    edit_steps: int = 50,
    fixed_point: int = 0,
    num_samples: int = 4,
    edit: Union[list[str], str, None] = None,
    edit_top: int = 4,
    unconditional: int = 0,
) -> dict:
    """Conditional sampling, DDIM inversion and prototype-guided editing from a Patronus checkpoint.

    Args:
        images: reference image files (size and channels of the model); default: dataset rows.
        resize: resize reference images instead of rejecting other sizes.
        indices: reference images by dataset index, e.g. [0,5,9] (default: 0..7).
        sampler: ddim (deterministic) or ddpm (ancestral).
        steps: steps of the samples.
        edit_steps: DDIM steps of the edits: inversion, reconstruction and every edited decode.
        fixed_point: extra denoiser calls per inversion step solving it exactly (fixed-point
            inversion): faithful reconstructions with far fewer steps (benchmarks/edit_latency.py).
        num_samples: new samples per reference.
        edit: prototype edits, one image row each: 3=q99 | 3=q95 | 7=0 | 5*2 | 2+1.5 | 2+2sd (in units of the
            prototype's spread), comma-joined to combine (3=q99,7=q01); several as a list [3=q99,7=0].
            Default: the `edit_top` most variable raised to q99.
        edit_top: without `edit`: raise the N most variable prototypes to their q99.
        unconditional: also decode N samples of the trained activation prior.
    """
    check_positive(steps=steps, edit_steps=edit_steps, num_samples=num_samples)
    pipe, out = ctx.pipe, ctx.out
    K = pipe.num_prototypes
    specs = [edit] if isinstance(edit, str) else list(edit or [])
    edits = [parse_edit(e, K) for e in specs]
    refs, names = references(ctx, images, resize, indices)
    refs = refs.to(pipe.device)
    summary: dict = {
        "checkpoint": str(resolve_checkpoint(ctx.checkpoint)),
        "references": names,
        "sampler": sampler,
        "steps": steps,
        "edit_steps": edit_steps,
        "fixed_point": fixed_point,
        "edit_guidance": pipe.edit_guidance,
        "coupling": pipe.coupling,
        "inversion": pipe.inversion,
        "seed": ctx.seed,
        "files": {},
    }

    # 1. Conditional samples: same s as each reference, fresh x_T.
    s = pipe.encode(refs).s
    samples = [pipe.sample(s, seed=ctx.seed + k, steps=steps, sampler=sampler) for k in range(num_samples)]
    summary["files"]["samples"] = str(plots.save_rows([refs, *samples], out / "samples.png"))

    # 2. Edits in units of the dataset's activation quantiles (cached beside the checkpoint).
    try:
        stats = ctx.statistics()
    except ValueError:
        if not images:
            raise
        stats = activation_statistics(s.cpu(), keep_activations=True)  # only image files and no dataset: their own spread is all there is
    levels = edit_levels(stats)
    if not edits and edit_top > 0:
        spread = torch.tensor(stats["std"])
        edits = [[Edit(j, "set", "q99")] for j in spread.argsort(descending=True)[:edit_top].tolist()]

    # 3. DDIM inversion, reconstruction and every edit decoded from the same inverted x_T.
    res = pipe.edit(refs, edits, edit_steps, levels=levels, fixed_point=fixed_point)
    recon = res.reconstruction
    summary["reconstruction_psnr_db"] = psnr(recon, refs)
    summary["reconstruction_psnr_db_mean"] = sum(summary["reconstruction_psnr_db"]) / len(refs)
    summary["files"]["reconstructions"] = str(plots.save_rows([refs, recon], out / "reconstructions.png"))
    if edits:
        s_recon = pipe.encode(recon).s
        report = []
        for e, img, req in zip(edits, res.images, res.requested):
            got = pipe.encode(img).s
            report.append(
                {
                    "edit": ",".join(map(str, e)),
                    "prototypes": {
                        str(one.prototype): {
                            "requested_mean": float(req[:, one.prototype].mean()),
                            "reconstruction_mean": float(s_recon[:, one.prototype].mean()),
                            "decoded_mean": float(got[:, one.prototype].mean()),
                        }
                        for one in e
                    },
                }
            )
        summary["edits"] = report
        summary["files"]["edits"] = str(plots.save_rows([refs, recon, *res.images], out / "edits.png"))
    if unconditional:
        if pipe.prior is None:
            raise FileNotFoundError(
                f"{ctx.checkpoint}: no trained activation prior; run `python -m patronus prior --checkpoint {ctx.checkpoint}` first"
            )
        generated, _ = pipe.generate(unconditional, steps, ctx.seed)
        summary["files"]["unconditional"] = str(plots.save_rows([generated], out / "unconditional.png"))
    summary["activation_range"] = {"q01": stats["q01"], "q99": stats["q99"]}
    write_json(summary, out / "summary.json")
    if wants_wandb(ctx.wandb, ctx.checkpoint):
        summary["wandb_dir"] = log_analysis(ctx.checkpoint, "sample", summary, out)
    return summary


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="sample.py", description=(sample.__doc__ or "").strip().splitlines()[0])
    # Edit guidance 2 with neighbours edits (the common --coupling default): on the default run the
    # edit reaches the requested change (1.01; 0.73 at w = 1); w = 4 overshoots it (docs/sampling.md,
    # measured by benchmarks/inversion_edits.py). The analyses keep w = 1 unless asked.
    add_common_arguments(parser, default_out=DEFAULT_OUT, default_edit_guidance=EDIT_GUIDANCE)
    parser.add_function_arguments(sample, skip={"ctx"}, fail_untyped=True)
    return parser


def with_default_run(argv: list[str]) -> list[str]:
    """`python sample.py` alone samples from the default run into outputs/<run name>; exit 2 with the one
    command that makes the run if there is none."""
    if any(a in ("-h", "--help") or a == "--checkpoint" or a.startswith("--checkpoint=") for a in argv):
        return argv
    if not DEFAULT_RUN.is_dir():
        print(
            f"sample.py: no --checkpoint and no default run at {DEFAULT_RUN}; make it with `python train.py` "
            f"(about 5 min on 2 CPU cores) or pass --checkpoint RUN",
            file=sys.stderr,
        )
        raise SystemExit(2)
    out = [] if any(a == "--out" or a.startswith("--out=") for a in argv) else ["--out", f"outputs/{DEFAULT_RUN.name}"]
    return ["--checkpoint", str(DEFAULT_RUN), *out, *argv]


def main(argv: Optional[list[str]] = None) -> dict:
    """`python sample.py [--checkpoint RUN --out DIR] [--edit 3=q99] ...`"""
    argv = with_default_run(sys.argv[1:] if argv is None else list(argv))
    debug = wants_debug(argv)
    options = build_parser().parse_args(argv).as_dict()

    return report_user_errors(lambda: sample(open_context(options, lambda checkpoint: Path(DEFAULT_OUT)), **options), debug)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
