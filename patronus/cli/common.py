"""What every command line shares: the data source, the command context and user-error handling.

One flag style everywhere (jsonargparse, as LightningCLI for `train.py`): `--checkpoint`,
`--data.dataset`, `--data.root`, `--data.split`, `--steps`, `--seed`, `--device`, `--out`.
A user error (bad value, missing file, out-of-range prototype) ends with one line
`error: ...` and exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from jsonargparse import ArgumentParser

from patronus import runs
from patronus.data.datasets import LabelledImageDataset, SubsetDataset, holdout_split
from patronus.data.registry import build_dataset, dataset_options
from patronus.interpret.stats import KEYS as STATISTICS_KEYS
from patronus.interpret.stats import activation_statistics
from patronus.pipeline import Coupling, Inversion, PatronusPipeline

USER_ERRORS = (ValueError, FileNotFoundError, IndexError)
STATS_IMAGES = 2000  # images behind every command's activation statistics (so they share one cache file)


@dataclass
class DataSource:
    """Which images a command reads; by default the data the run was validated on.

    Args:
        dataset: dataset registry name (default: the run's `data.dataset`).
        root: dataset root folder (default: the run's `data.root`).
        split: `validation` (what the run validated on, its holdout included), `training` (what it
            trained on), or a split name of the dataset (e.g. `test`). Default: the command's own.
        options: dataset-specific builder options (default: the run's, for the run's dataset).
    """

    dataset: Optional[str] = None
    root: Optional[str] = None
    split: Optional[str] = None
    options: Optional[dict[str, Any]] = None


def run_dataset(
    checkpoint: str, pipe: PatronusPipeline, source: DataSource, default_split: str = "validation", group_balanced: bool = False
) -> LabelledImageDataset:
    """The dataset a command reads, with the run's options, shortcut and holdout applied.

    `group_balanced`: a run trained on a planted marker gets it re-planted independently of the
    target (p = q = 0.5), so every target × marker group is well populated: the held-out set on
    which the field scores worst-group accuracy. Other data is read as it is."""
    cfg = runs.run_config(checkpoint).get("data", {}) or {}
    name, root = source.dataset or cfg.get("dataset"), source.root or cfg.get("root")
    if not (name and root):
        raise ValueError("data: no dataset known for this checkpoint (no run config.yaml); pass --data.dataset and --data.root")
    same = name == cfg.get("dataset")
    options = dict(source.options if source.options is not None else (cfg.get("options") or {}) if same else {})
    if "channels" in dataset_options(name):
        options.setdefault("channels", pipe.model.config.in_channels)
    split = source.split or default_split
    holdout = cfg.get("holdout") if same else None
    if split in ("validation", "training"):
        published = cfg.get("train_split", "train") if (holdout or split == "training") else cfg.get("val_split", "test")
        published = published if same else ("train" if split == "training" else "test")
    else:
        published = split
    ds = build_dataset(name, root, published, pipe.model.config.image_size, **options)
    shortcut = cfg.get("shortcut") if same else None
    if shortcut:  # the run trained on a shortcut dataset (e.g. a planted marker): analyse the same data
        from patronus.data.shortcuts import apply_shortcut

        if group_balanced and shortcut.get("kind") == "planted_marker":
            shortcut = {**shortcut, "p": 0.5, "q": 0.5}
        ds, _ = apply_shortcut(ds, pipe.model.config.image_size, shortcut)
    if holdout and split in ("validation", "training"):
        train, val = holdout_split(len(ds), holdout)
        ds = SubsetDataset(ds, val if split == "validation" else train)
    ds.source = {
        "dataset": name,
        "root": str(root),
        "split": split,
        "published_split": published,
        **options,
        **({"holdout": holdout} if holdout and split in ("validation", "training") else {}),
        **({"shortcut": shortcut} if shortcut else {}),
    }
    return ds


def first_images(ds: LabelledImageDataset, n: int) -> torch.Tensor:
    """The first n images of a dataset (fewer if it is smaller), (n, C, H, W) in [-1, 1]."""
    if n < 1:
        raise ValueError(f"num_images={n}; expected at least 1")
    return torch.stack([ds[i]["image"] for i in range(min(n, len(ds)))])


@dataclass
class Context:
    """What a command works with: the pipeline, where its outputs go, and its data (built on demand)."""

    pipe: PatronusPipeline
    checkpoint: str
    out: Path
    seed: int
    data: DataSource
    default_split: str = "validation"
    wandb: Optional[bool] = None  # log to a linked wandb run (None: when the run was trained with wandb)
    _datasets: dict = field(default_factory=dict, repr=False)

    def dataset(self, split: Optional[str] = None) -> LabelledImageDataset:
        key = split or self.data.split or self.default_split
        if key not in self._datasets:
            source = DataSource(self.data.dataset, self.data.root, key, self.data.options)
            self._datasets[key] = run_dataset(self.checkpoint, self.pipe, source, self.default_split)
        return self._datasets[key]

    def images(self, n: int, split: Optional[str] = None) -> torch.Tensor:
        return first_images(self.dataset(split), n)

    def statistics(self, num_images: int = STATS_IMAGES, split: Optional[str] = None) -> dict[str, Any]:
        """Per-prototype activation statistics of the first `num_images` images (cached by source)."""
        ds = self.dataset(split)
        n = min(num_images, len(ds))
        return runs.cached_statistics(
            self.checkpoint,
            {**ds.source, "images": n},
            lambda: activation_statistics(self.pipe.encode(first_images(ds, n)).s, keep_activations=True),
            self.pipe.num_prototypes,
            STATISTICS_KEYS,
        )

    def check_prototypes(self, prototypes: Optional[list[int]], name: str = "prototypes") -> Optional[list[int]]:
        """`prototypes` (None stays None), after checking each index exists."""
        if prototypes is None:
            return None
        prototypes = [prototypes] if isinstance(prototypes, int) else list(prototypes)
        K = self.pipe.num_prototypes
        bad = [j for j in prototypes if not 0 <= j < K]
        if bad:
            raise ValueError(f"{name} {bad}: the model has K={K} prototypes (0..{K - 1})")
        return prototypes


def check_positive(**values: int) -> None:
    """ValueError naming the first value < 1 (steps, images, ...)."""
    for name, v in values.items():
        if v is not None and v < 1:
            raise ValueError(f"{name}={v}; expected at least 1")


def add_common_arguments(parser: ArgumentParser, default_out: Optional[str] = None, default_edit_guidance: float = 1.0) -> None:
    """--checkpoint, --data.*, --out, --seed, --device, --debug: the same names in every command."""
    parser.add_argument("--checkpoint", type=str, required=True, help="run directory, exported model directory, saved pipeline or .ckpt")
    parser.add_class_arguments(DataSource, "data")
    parser.add_argument("--out", type=Optional[str], default=default_out, help="output folder (default: RUN/analysis/<command>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (noise, splits)")
    parser.add_argument("--device", type=Optional[str], default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument(
        "--edit_guidance",
        type=float,
        default=default_edit_guidance,
        help="edit guidance for every edit, ε(s) + w(ε(s_edit) − ε(s)) (any model)",
    )
    parser.add_argument(
        "--inversion",
        type=Inversion,
        default="ddim",
        help="how every edit inverts its images: ddim (one x_T) or edit_friendly (DDPM noise maps)",
    )
    parser.add_argument(
        "--coupling",
        type=Coupling,
        default="neighbours",
        help="what else every edit moves: alone (only the named prototypes), correlated (the others follow them "
        "along the data's linear regression) or neighbours (the others of the real images nearest the edit; "
        "the decode follows it furthest)",
    )
    parser.add_argument("--debug", type=bool, default=False, help="show the traceback of an error")
    parser.add_argument(
        "--wandb",
        type=Optional[bool],
        default=None,
        help="also log pictures and numbers to an offline wandb run grouped with the training run "
        "(default: when the run was trained with wandb)",
    )


COMMON = ("checkpoint", "out", "seed", "device", "debug", "edit_guidance", "inversion", "coupling", "wandb")


def load_pipeline(
    checkpoint: str,
    device: Optional[str],
    edit_guidance: float = 1.0,
    inversion: Inversion = "ddim",
    coupling: Coupling = "alone",
) -> PatronusPipeline:
    """The pipeline of a checkpoint on `device`, with the command's edit settings as its defaults."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = PatronusPipeline.from_pretrained(checkpoint, device=device)
    pipe.edit_guidance, pipe.inversion, pipe.coupling = edit_guidance, inversion, coupling
    pipe.set_progress_bar_config(disable=not sys.stderr.isatty(), leave=False)
    return pipe


def open_context(options: dict[str, Any], out: Callable[[str], Path], default_split: str = "validation") -> Context:
    """The command's Context from parsed options: the common ones are popped (the rest are the
    command's own), the pipeline is loaded with the edit settings as its defaults, and the output
    folder (`--out`, else `out(checkpoint)`) is created."""
    common = {k: options.pop(k) for k in COMMON}
    data = DataSource(**dict(options.pop("data") or {}))
    pipe = load_pipeline(common["checkpoint"], common["device"], common["edit_guidance"], common["inversion"], common["coupling"])
    folder = Path(common["out"]) if common["out"] else out(common["checkpoint"])
    folder.mkdir(parents=True, exist_ok=True)
    return Context(pipe, common["checkpoint"], folder, common["seed"], data, default_split, common["wandb"])


def write_json(result: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path


def report_user_errors(run: Callable[[], Any], debug: bool) -> Any:
    """Run a command; a user error becomes one `error: ...` line and exit code 2 (unless --debug)."""
    try:
        return run()
    except USER_ERRORS as e:
        if debug:
            raise
        message = e.args[0] if isinstance(e, (FileNotFoundError, KeyError)) and e.args else str(e)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def wants_debug(argv: Optional[list[str]]) -> bool:
    """--debug before parsing, so even errors while parsing can show their traceback."""
    args = sys.argv[1:] if argv is None else argv
    return any(a in ("--debug", "--debug=true", "--debug=True") for a in args)
