"""`sample.py`: conditional samples, DDIM inversion + reconstruction, prototype-guided edits -> PNG + JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml
from torchmetrics.functional.image import peak_signal_noise_ratio
from torchvision.utils import make_grid, save_image

from patronus.callbacks import to_unit
from patronus.checkpoints import analysis_dir, load_model, resolve_checkpoint
from patronus.data.registry import build_dataset, dataset_options
from patronus.data.images import read_image
from patronus.diffusion import ddim_invert, ddim_sample, ddpm_sample
from patronus.interpret.edits import Edit, apply_edits, parse_edit
from patronus.interpret.stats import activation_statistics, cached_statistics
from patronus.models.patronus import PatronusModel


@torch.no_grad()
def encode_all(model: PatronusModel, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Activations (N, K) of many images, in batches."""
    dev = next(model.parameters()).device
    return torch.cat([model.encode(images[i : i + batch_size].to(dev)).cpu() for i in range(0, len(images), batch_size)])


def noise_like(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Reproducible x_T on any device (drawn on the CPU)."""
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.device)


@torch.no_grad()
def conditional_samples(
    model: PatronusModel, refs: torch.Tensor, num_samples: int, steps: int, sampler: str = "ddim", seed: int = 0
) -> torch.Tensor:
    """New images that share each reference's activations s: (num_samples, B, C, H, W)."""
    s = model.encode(refs)
    out = []
    for k in range(num_samples):
        x_T = noise_like(refs, seed + k)
        if sampler == "ddim":
            out.append(ddim_sample(model, x_T, s, num_steps=steps))
        else:
            out.append(ddpm_sample(model, x_T, s, num_steps=steps, generator=torch.Generator().manual_seed(seed + k)))
    return torch.stack(out)


@torch.no_grad()
def unconditional_samples(model: PatronusModel, prior, n: int, steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations from the prior, decoded by the image model: images (n, C, H, W) and their s (n, K)."""
    dev = next(model.parameters()).device
    s = prior.to(dev).sample(n, steps=steps, seed=seed, device=dev)
    c = model.config
    x_T = torch.randn(n, c.in_channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(seed + 1)).to(dev)
    return ddim_sample(model, x_T, s, num_steps=steps), s


def prior_dir(checkpoint: str) -> Path:
    """Where `python -m patronus prior` saves the activation prior of a checkpoint."""
    return analysis_dir(checkpoint) / "prior" / "model"


def load_prior(checkpoint: str):
    """The trained activation prior of a checkpoint, with a clear error when there is none yet."""
    from patronus.models.prior import ActivationPrior

    folder = prior_dir(checkpoint)
    if not (folder / ActivationPrior.config_name).is_file():
        raise FileNotFoundError(f"{folder}: no trained prior; run `python -m patronus prior --checkpoint {checkpoint}` first")
    return ActivationPrior.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False).eval()


@torch.no_grad()
def reconstruct(model: PatronusModel, x0: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM-invert x0 under its own s, decode again: (x_T, reconstruction)."""
    s = model.encode(x0)
    x_T = ddim_invert(model, x0, s, num_steps=steps)
    return x_T, ddim_sample(model, x_T, s, num_steps=steps, clip=False)


@torch.no_grad()
def decode_edits(
    model: PatronusModel, x_T: torch.Tensor, s: torch.Tensor, edits: Sequence[list[Edit]], s_min, s_max, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the same x_T under each edited s: images (E, B, C, H, W) and requested s (E, B, K)."""
    imgs, targets = [], []
    for edit in edits:
        s_new = apply_edits(s, edit, s_min.to(s.device), s_max.to(s.device))
        imgs.append(ddim_sample(model, x_T, s_new, num_steps=steps, clip=False))
        targets.append(s_new)
    return torch.stack(imgs), torch.stack(targets)


def psnr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per-image PSNR in dB for images in [-1, 1]."""
    return [float(peak_signal_noise_ratio(x, y, data_range=2.0)) for x, y in zip(a.clamp(-1, 1), b.clamp(-1, 1))]


def save_rows(rows: Sequence[torch.Tensor], path: Path) -> Path:
    """Rows of equally many images -> one PNG grid."""
    batch = torch.cat([r.cpu() for r in rows])
    save_image(make_grid(to_unit(batch), nrow=len(rows[0]), padding=1, pad_value=1.0), path)
    return path


def _run_data_config(checkpoint: str) -> dict:
    """Data settings of the run that made the checkpoint, so references default to its dataset."""
    path = Path(checkpoint)
    for candidate in (path / "config.yaml", path.parent / "config.yaml", path.parent.parent / "config.yaml"):
        if candidate.is_file():
            return (yaml.safe_load(candidate.read_text()) or {}).get("data", {}) or {}
    return {}


def split_dataset(checkpoint: str, model: PatronusModel, dataset: Optional[str], root: Optional[str], split: str):
    """The dataset split to analyse: given explicitly, or the one the run was trained on. None if unknown."""
    data_cfg = _run_data_config(checkpoint)
    dataset = dataset or data_cfg.get("dataset")
    root = root or data_cfg.get("root")
    if not (dataset and root):
        return None
    options = dict(data_cfg.get("options") or {}) if dataset == data_cfg.get("dataset") else {}
    if "channels" in dataset_options(dataset):
        options.setdefault("channels", model.config.in_channels)
    ds = build_dataset(dataset, root, split, model.config.image_size, **options)
    shortcut = data_cfg.get("shortcut") if dataset == data_cfg.get("dataset") else None
    if shortcut:  # the run trained on a shortcut dataset (e.g. a planted marker): analyse the same data
        from patronus.data.shortcuts import apply_shortcut

        ds, _ = apply_shortcut(ds, model.config.image_size, shortcut)
    ds.source = {"dataset": dataset, "root": str(root), "split": split, **options, **({"shortcut": shortcut} if shortcut else {})}
    return ds


def first_images(ds, n: int) -> torch.Tensor:
    return torch.stack([ds[i]["image"] for i in range(min(n, len(ds)))])


def load_references(args: argparse.Namespace, model: PatronusModel) -> tuple[torch.Tensor, list[str], Optional[torch.Tensor]]:
    """Reference images (B, C, H, W), their names, and a pool of dataset images for activation statistics."""
    c = model.config
    pool = None
    ds = split_dataset(args.checkpoint, model, args.dataset, args.data_root, args.split)
    if ds is not None:
        pool = first_images(ds, args.stats_images)
        args.pool_source = {**ds.source, "images": len(pool)}
    if args.images:
        refs = torch.stack([read_image(p, c.in_channels, size=None if args.resize else c.image_size,
                                       resize_to=c.image_size if args.resize else None) for p in args.images])
        return refs, [str(p) for p in args.images], pool
    if pool is None:
        raise ValueError("no references: pass --images FILE..., or --indices with --dataset and --data-root")
    idx = args.indices if args.indices is not None else list(range(8))
    bad = [i for i in idx if not 0 <= i < len(ds)]
    name = ds.source["dataset"]
    if bad:
        raise ValueError(f"--indices {bad}: out of range for {name} split {args.split!r} with {len(ds)} images")
    refs = torch.stack([ds[i]["image"] for i in idx])
    return refs, [f"{name}:{args.split}:{i}" for i in idx], pool


@torch.no_grad()
def run_from_args(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(args.checkpoint, device)
    K = model.config.num_prototypes
    edits = [parse_edit(e, K) for e in (args.edit or [])]
    refs, names, pool = load_references(args, model)
    refs = refs.to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {
        "checkpoint": str(resolve_checkpoint(args.checkpoint)),
        "references": names,
        "sampler": args.sampler,
        "steps": args.steps,
        "seed": args.seed,
        "files": {},
    }

    # 1. Conditional samples: same s as each reference, fresh x_T.
    samples = conditional_samples(model, refs, args.num_samples, args.steps, args.sampler, args.seed)
    summary["files"]["samples"] = str(save_rows([refs, *samples], out / "samples.png"))

    # 2. DDIM inversion and reconstruction from the inverted x_T.
    x_T, recon = reconstruct(model, refs, args.inversion_steps)
    summary["reconstruction_psnr_db"] = psnr(recon, refs)
    summary["reconstruction_psnr_db_mean"] = sum(summary["reconstruction_psnr_db"]) / len(refs)
    summary["files"]["reconstructions"] = str(save_rows([refs, recon], out / "reconstructions.png"))

    # 3. Prototype-guided edits, decoded from the same x_T.
    s = model.encode(refs)
    if pool is not None:  # dataset quantiles, cached next to the checkpoint
        stats = cached_statistics(model, pool, analysis_dir(args.checkpoint) / "activation_stats.json", args.pool_source)
    else:  # only image files given: their own spread is all there is
        stats = activation_statistics(s.cpu())
    s_min, s_max, spread = (torch.tensor(stats[k]) for k in ("min", "max", "std"))
    if not edits and args.edit_top > 0:
        edits = [[Edit(j, "set", "max")] for j in spread.argsort(descending=True)[: args.edit_top].tolist()]
    if edits:
        imgs, requested = decode_edits(model, x_T, s, edits, s_min, s_max, args.inversion_steps)
        s_recon = model.encode(recon)
        report = []
        for edit, img, req in zip(edits, imgs, requested):
            got = model.encode(img)
            report.append({
                "edit": ",".join(map(str, edit)),
                "prototypes": {
                    str(e.prototype): {
                        "requested_mean": float(req[:, e.prototype].mean()),
                        "reconstruction_mean": float(s_recon[:, e.prototype].mean()),
                        "decoded_mean": float(got[:, e.prototype].mean()),
                    }
                    for e in edit
                },
            })
        summary["edits"] = report
        summary["files"]["edits"] = str(save_rows([refs, recon, *imgs], out / "edits.png"))
    if args.unconditional:
        images, _ = unconditional_samples(model, load_prior(args.checkpoint), args.unconditional, args.steps, args.seed)
        summary["files"]["unconditional"] = str(save_rows([images], out / "unconditional.png"))
    summary["activation_range"] = {"min": s_min.tolist(), "max": s_max.tolist()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sample.py",
        description="Conditional sampling, DDIM inversion and prototype-guided editing from a Patronus checkpoint.",
    )
    p.add_argument("--checkpoint", required=True, help="run directory, exported model directory or .ckpt file")
    p.add_argument("--out", default="outputs/sample", help="folder for PNG grids and summary.json")
    p.add_argument("--images", nargs="+", help="reference image files (size and channels of the model)")
    p.add_argument("--resize", action="store_true", help="resize reference images instead of rejecting other sizes")
    p.add_argument("--indices", nargs="+", type=int, help="reference images by dataset index (default 0..7)")
    p.add_argument("--dataset", help="dataset name (default: the run's config)")
    p.add_argument("--data-root", help="dataset root (default: the run's config)")
    p.add_argument("--split", default="test", help="dataset split for references and activation statistics")
    p.add_argument("--stats-images", type=int, default=512, help="images used for per-prototype min/max")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (DDPM: all T when 0)")
    p.add_argument("--inversion-steps", type=int, default=50, help="DDIM steps for inversion and edits")
    p.add_argument("--num-samples", type=int, default=4, help="samples per reference")
    p.add_argument("--edit", action="append", help="prototype edit, e.g. 3=max | 7=0 | 5*2 | 2+1.5; "
                   "repeat for more columns, comma-join to combine (3=max,7=min)")
    p.add_argument("--edit-top", type=int, default=4, help="without --edit: raise the N most variable prototypes to max")
    p.add_argument("--unconditional", type=int, default=0, help="also decode N samples of the trained activation prior")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    return p
