"""The run-directory layout, in one place: resolve, load, export, config, analysis folder,
activation-statistics cache and the activation prior.

    RUN/config.yaml                     resolved training config (LightningCLI)
    RUN/checkpoints/last.ckpt, step*.ckpt
    RUN/model/                          exported model: config.json + safetensors (EMA weights)
    RUN/samples/step_*.png              sample grids logged during training
    RUN/interpret/step_*/               the interpretability monitor's probes
    RUN/analysis/<command>/             every analysis' PNGs + JSON
    RUN/analysis/activation_stats/<key>.json   statistics, keyed by the images they were computed on
    RUN/analysis/prior/model/           the activation prior (config.json + safetensors)

Models load safely: safetensors, or Lightning checkpoints with `torch.load(weights_only=True)`;
nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

from patronus.models.patronus import PatronusModel
from patronus.models.prior import ActivationPrior

MODEL_DIR = "model"
PIPELINE_INDEX = "model_index.json"  # what diffusers' save_pretrained writes for a whole pipeline
CHECKPOINT_DIR = "checkpoints"
LAST_CKPT = Path(CHECKPOINT_DIR) / "last.ckpt"
SAMPLES_DIR = "samples"
MONITOR_DIR = "interpret"
CONFIG_FILE = "config.yaml"
ANALYSIS_DIR = "analysis"
STATS_DIR = Path(ANALYSIS_DIR) / "activation_stats"
PRIOR_DIR = Path(ANALYSIS_DIR) / "prior" / "model"


def resolve_checkpoint(path: str | Path) -> Path:
    """RUN dir -> RUN/model (if exported) or RUN/checkpoints/last.ckpt; files and model dirs as given."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path}: no such file or directory")
    if path.is_dir() and not (path / PatronusModel.config_name).is_file():
        for candidate in (path / MODEL_DIR, path / LAST_CKPT):
            if candidate.exists():
                return candidate
        raise FileNotFoundError(
            f"checkpoint {path}: a directory without {PatronusModel.config_name}, {MODEL_DIR}/ or {LAST_CKPT}; "
            "expected a run directory, an exported model directory or a .ckpt file"
        )
    return path


def home_of(checkpoint: str | Path) -> Path:
    """The folder a checkpoint belongs to: its run directory when it has one, else the folder it is in."""
    path = resolve_checkpoint(checkpoint)
    if path.is_file():
        return path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
    if path.name == MODEL_DIR and any((path.parent / f).is_file() for f in (CONFIG_FILE, PIPELINE_INDEX)):
        return path.parent  # a run directory, or a saved PatronusPipeline
    return path


def analysis_dir(checkpoint: str | Path) -> Path:
    """Where analyses of a checkpoint go: RUN/analysis (or beside an exported model / .ckpt)."""
    return home_of(checkpoint) / ANALYSIS_DIR


def run_config(checkpoint: str | Path) -> dict[str, Any]:
    """The resolved training config of the run that made the checkpoint ({} when there is none)."""
    path = home_of(checkpoint) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e


def export_model(net: PatronusModel, out_dir: str | Path) -> Path:
    """`save_pretrained` into a temporary sibling, then swap it in: a crash leaves the old export."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    net.save_pretrained(tmp, safe_serialization=True)
    old = out_dir.with_name(f".{out_dir.name}-old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _from_lightning_ckpt(path: Path) -> PatronusModel:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{path}: not a readable Lightning checkpoint (weights_only load failed: {e})") from e
    if "net_config" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path}: checkpoint has no 'net_config'/'state_dict'; was it written by patronus?")
    net = PatronusModel.from_config(ckpt["net_config"])
    # With EMA on, Lightning's WeightAveraging stores the averaged weights as "state_dict".
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    return net


def load_model(path: str | Path, device: str | torch.device = "cpu") -> PatronusModel:
    """A model for sampling/analysis from a run dir, an exported dir or a .ckpt file (eval mode)."""
    path = resolve_checkpoint(path)
    if path.is_dir():
        config = json.loads((path / PatronusModel.config_name).read_text())
        _, unused, _ = PatronusModel.extract_init_dict(config)
        unknown = [k for k in unused if not k.startswith("_")]
        if unknown:
            raise ValueError(f"{path / PatronusModel.config_name}: unknown fields {sorted(unknown)} for PatronusModel")
        net = PatronusModel.from_pretrained(path, use_safetensors=True, low_cpu_mem_usage=False)
    else:
        net = _from_lightning_ckpt(path)
    return net.to(device).eval()


def prior_dir(checkpoint: str | Path) -> Path:
    """Where the activation prior of a checkpoint is saved (`python -m patronus prior`)."""
    return home_of(checkpoint) / PRIOR_DIR


def load_prior(checkpoint: str | Path) -> ActivationPrior:
    """The trained activation prior of a checkpoint, with a clear error when there is none yet."""
    folder = prior_dir(checkpoint)
    if not (folder / ActivationPrior.config_name).is_file():
        raise FileNotFoundError(f"{folder}: no trained activation prior; run `python -m patronus prior --checkpoint {checkpoint}` first")
    return ActivationPrior.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False).eval()


def statistics_path(checkpoint: str | Path, source: dict[str, Any]) -> Path:
    """The cache file for activation statistics computed on `source` (dataset, root, split, options,
    number of images): one file per source, so commands with the same source share it and others
    never overwrite it."""
    key = hashlib.sha1(json.dumps(source, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return home_of(checkpoint) / STATS_DIR / f"{key}.json"


def cached_statistics(checkpoint: str | Path, source: dict[str, Any], compute: Callable[[], dict[str, Any]],
                      num_prototypes: Optional[int] = None) -> dict[str, Any]:
    """Statistics for `source`, computed by `compute()` once and stored with what they were computed on."""
    cache = statistics_path(checkpoint, source)
    if cache.is_file():
        try:
            stored = json.loads(cache.read_text())
        except json.JSONDecodeError:  # a damaged cache is recomputed, never trusted
            stored = {}
        if stored.get("source") == source and (num_prototypes is None or len(stored.get("mean", [])) == num_prototypes):
            return stored
    stats = {"source": source, **compute()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats, indent=1))
    tmp.replace(cache)
    return stats
