"""Exporting and loading models safely: safetensors + JSON, or Lightning checkpoints with weights_only."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from patronus.models.patronus import PatronusModel

MODEL_DIR = "model"  # RUN/model: the exported diffusers-style directory
LAST_CKPT = Path("checkpoints") / "last.ckpt"


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


def resolve_checkpoint(path: str | Path) -> Path:
    """RUN dir -> RUN/model (if exported) or RUN/checkpoints/last.ckpt; files and model dirs as given."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path}: no such file or directory")
    if path.is_dir() and not (path / PatronusModel.config_name).is_file():
        for candidate in (path / MODEL_DIR, path / LAST_CKPT):
            if candidate.exists():
                return candidate
        raise FileNotFoundError(
            f"--checkpoint {path}: a directory without {PatronusModel.config_name}, {MODEL_DIR}/ or {LAST_CKPT}; "
            "expected a run directory, an exported model directory or a .ckpt file"
        )
    return path


def analysis_dir(checkpoint: str | Path) -> Path:
    """Where analyses of a checkpoint are cached: RUN/analysis (or beside an exported model/ckpt)."""
    path = resolve_checkpoint(checkpoint)
    if path.is_file():
        path = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    elif path.name == MODEL_DIR and (path.parent / "config.yaml").is_file():
        path = path.parent
    return path / "analysis"


def load_model(path: str | Path, device: str | torch.device = "cpu") -> PatronusModel:
    """Load a model for sampling/analysis from a run dir, an exported dir or a .ckpt file."""
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
