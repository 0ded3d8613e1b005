"""`python -m patronus prepare --data.dataset NAME --data.root PATH --data.image_size S --out DIR_OR_URI`:
write a dataset once, at the training resolution, as a litdata optimized dataset that
`data.dataset: streaming` reads (patronus.data.streaming). `--train_config configs/X.yaml` takes the
data section and the model's image size and channels of a training preset, so the prepared data
is exactly what that preset trains on; `--data.*` flags override it.

Every split the preset reads is written whole (`--splits` chooses others); row selections
(data.train_subset, data.val_subset, data.holdout) stay in the training config and are applied
to the prepared data as to any dataset. A shortcut (`data.shortcut`) is baked into the images:
train on it with `--data.shortcut null`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import yaml
from jsonargparse import ArgumentParser, Namespace

from patronus.cli.common import report_user_errors, wants_debug
from patronus.data.datamodule import PatronusDataModule
from patronus.data.streaming import is_uri, prepare

# DataModule options that decide what the images and labels are; the rest (batch sizes, workers,
# row selections) belong to training and are ignored in a --train_config.
CONTENT = ("dataset", "root", "image_size", "channels", "options", "shortcut", "download", "train_split", "val_split", "holdout")
SKIPPED = {"batch_size", "val_batch_size", "num_workers", "train_subset", "val_subset"}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m patronus prepare",
        description="Write a dataset at the training resolution as litdata chunks, for data.dataset=streaming.",
    )
    p.add_argument(
        "--train_config",
        type=Optional[str],
        default=None,
        help="a train.py config (e.g. configs/celeba_paper.yaml): its data section and model.net image_size / "
        "in_channels are the defaults of --data.*",
    )
    p.add_class_arguments(PatronusDataModule, "data", skip=SKIPPED)
    p.add_argument(
        "--out",
        type=str,
        required=True,
        help="folder (local or shared filesystem) or object-storage URI (s3://bucket/path, gs://...) to write to",
    )
    p.add_argument(
        "--splits",
        type=Optional[list[str]],
        default=None,
        help="splits to write (default: data.train_split and data.val_split; only data.train_split with a "
        "data.holdout, which training takes from it)",
    )
    p.add_argument(
        "--balanced_splits",
        type=list[str],
        default=[],
        help="with a planted_marker shortcut: also write these splits as SPLIT_balanced, the marker planted "
        "independently of the target (p = q = 0.5), for the shortcut report's --group_split",
    )
    p.add_argument("--limit", type=Optional[int], default=None, help="write only the first N rows of each split (quick tests)")
    p.add_argument("--chunk_bytes", type=str, default="64MB", help="size of a litdata chunk (the unit a rank downloads and shuffles)")
    p.add_argument("--num_workers", type=Optional[int], default=None, help="processes that encode rows (default: CPU count, at most 8)")
    p.add_argument("--storage_options", type=Optional[dict], default=None, help="litdata's options for object storage (endpoint, keys)")
    p.add_argument("--overwrite", type=bool, default=False, help="replace an earlier preparation in --out")
    p.add_argument("--debug", type=bool, default=False, help="show the traceback of an error")
    return p


def train_config_defaults(path: str) -> dict[str, Any]:
    """--data.* defaults from a train.py config: its data content and the model's image size/channels."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--train_config {path}: no such file")
    try:
        cfg = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"--train_config {path}: not valid YAML ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("data") or {}, dict):
        raise ValueError(f"--train_config {path}: expected a mapping with a 'data:' section (a train.py config)")
    data = {k: v for k, v in (cfg.get("data") or {}).items() if k in CONTENT}
    net = ((cfg.get("model") or {}).get("net") or {}) if isinstance(cfg.get("model"), dict) else {}
    net = net.get("init_args", net) if isinstance(net, dict) else {}
    if "image_size" in net:
        data.setdefault("image_size", net["image_size"])
    if "in_channels" in net:
        data.setdefault("channels", net["in_channels"])
    return {f"data.{k}": v for k, v in data.items()}


def _train_config_arg(argv: list[str]) -> Optional[str]:
    for i, a in enumerate(argv):
        if a.startswith("--train_config="):
            return a.split("=", 1)[1]
        if a == "--train_config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def parse(argv: Optional[list[str]] = None) -> Namespace:
    """The options, with a --train_config's values as defaults (flags still override them)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    path = _train_config_arg(argv)
    if path:
        parser.set_defaults(train_config_defaults(path))
    return parser.parse_args(argv)


def run(a: Namespace) -> dict[str, Any]:
    """Build the splits as the DataModule reads them and write them under --out."""
    d = {k: v for k, v in dict(a.data).items() if k in CONTENT}
    if d["dataset"] == "streaming":
        raise ValueError("data.dataset='streaming' is already prepared data; prepare from the original dataset")
    if a.limit is not None and a.limit < 1:
        raise ValueError(f"limit={a.limit}; expected at least 1 row per split")
    splits = list(dict.fromkeys(a.splits or ([d["train_split"]] if d.get("holdout") else [d["train_split"], d["val_split"]])))
    if a.balanced_splits and (d.get("shortcut") or {}).get("kind") != "planted_marker":
        raise ValueError("balanced_splits: needs a planted_marker data.shortcut (re-planted with p = q = 0.5)")
    module = PatronusDataModule(**d)
    datasets = {split: module.build_split(split, a.limit) for split in splits}
    if a.balanced_splits:
        balanced = PatronusDataModule(**{**d, "shortcut": {**d["shortcut"], "p": 0.5, "q": 0.5}})
        datasets |= {f"{split}_balanced": balanced.build_split(split, a.limit) for split in a.balanced_splits}
    root = d["root"] if is_uri(str(d["root"])) else str(Path(d["root"]).resolve())
    source = {**d, "root": root, "limit": a.limit}
    meta = prepare(
        datasets,
        a.out,
        source,
        chunk_bytes=a.chunk_bytes,
        num_workers=a.num_workers,
        overwrite=a.overwrite,
        storage_options=a.storage_options,
    )
    summary = {
        "out": a.out,
        "image_size": meta["image_size"],
        "channels": meta["channels"],
        "splits": {name: info["rows"] for name, info in meta["splits"].items()},
        "keys": sorted({k for info in meta["splits"].values() for k in info["keys"]}),
        "train_with": f"--data.dataset streaming --data.root {a.out}" + (" --data.shortcut null" if d.get("shortcut") else ""),
    }
    print(json.dumps(summary, indent=1))
    return summary


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    debug = wants_debug(argv)
    return report_user_errors(lambda: run(parse(argv)), debug)
