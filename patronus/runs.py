"""The run-directory layout, in one place: resolve, load, export, config, analysis folder,
activation-statistics cache and the activation prior.

    RUN/config.yaml                     resolved training config (LightningCLI)
    RUN/checkpoints/last.ckpt, step*.ckpt
    RUN/model/                          exported model: config.json + safetensors (EMA weights)
    RUN/samples/step_*.png              sample grids logged during training
    RUN/interpret/step_*/               the interpretability monitor's probes
    RUN/analysis/<command>/             every analysis' PNGs + JSON
    RUN/analysis/activation_stats/<key>.json   statistics, keyed by the images and the weights they came from
    RUN/analysis/prior/model/           the activation prior (config.json + safetensors + encoder.sha1)

Models load safely: safetensors, or Lightning checkpoints with `torch.load(weights_only=True)` (safe_load.py);
nothing is ever unpickled, and weights that are not finite (a diverged run) are refused.
Every file written here goes to a temporary file in the SAME folder, is fsynced, then renamed:
a kill leaves the old file or the new one, never a truncated one (a temporary folder on another
filesystem would turn the rename into a copy that a kill can cut short).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Optional

import torch
import yaml

from patronus.models.patronus import PatronusModel
from patronus.models.prior import ActivationPrior
from patronus.safe_load import load_torch_file

MODEL_DIR = "model"
PIPELINE_INDEX = "model_index.json"  # what diffusers' save_pretrained writes for a whole pipeline
CHECKPOINT_DIR = "checkpoints"
LAST_CKPT = Path(CHECKPOINT_DIR) / "last.ckpt"
CORRUPT_DIR = "corrupt"  # RUN/checkpoints/corrupt/: unreadable checkpoints are moved here, never deleted
TMP_PREFIX = ".tmp-"  # temporary files of atomic writes: RUN/checkpoints/.tmp-<name>-<random>
SAMPLES_DIR = "samples"
MONITOR_DIR = "interpret"
CONFIG_FILE = "config.yaml"
ANALYSIS_DIR = "analysis"
STATS_DIR = Path(ANALYSIS_DIR) / "activation_stats"
PRIOR_DIR = Path(ANALYSIS_DIR) / "prior" / "model"
PRIOR_ENCODER_FILE = "encoder.sha1"  # beside the prior: `encoder_digest` of the model it was fitted to


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """`write(fh)` into a temporary file beside `path`, fsync, then `os.replace`: readers see the old
    file or the complete new one. The temporary file is removed on any error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; readable as an ordinary file would be
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files and folders our own atomic writes left when a run was killed
    (only names starting with TMP_PREFIX or `.model-`, which nothing else writes)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(TMP_PREFIX) or p.name.startswith(f".{MODEL_DIR}-")]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


def non_finite(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf (a diverged run)."""
    return [k for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_finite(tensors: Mapping[str, Any], where: str) -> None:
    """ValueError naming `where` when any weight is NaN/inf: such a model samples noise, silently."""
    bad = non_finite(tensors)
    if bad:
        raise ValueError(
            f"{where}: {len(bad)} of {len(tensors)} tensors hold NaN/inf (e.g. {bad[:3]}): the training "
            "run diverged; use an earlier checkpoint, or retrain with a lower model.lr"
        )


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
    """`save_pretrained` into a temporary sibling, fsync, then swap it in: a crash leaves the old
    export. Non-finite weights are refused: a diverged model is never exported."""
    out_dir = Path(out_dir)
    check_finite(net.state_dict(), f"export to {out_dir} refused")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    net.save_pretrained(tmp, safe_serialization=True)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    old = out_dir.with_name(f".{out_dir.name}-old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    tmp.rename(out_dir)
    _fsync_dir(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


# Model options that were removed, with the value the model now always has: a saved model that used
# that value still loads; any other value is named as retired.
RETIRED_OPTIONS = {
    "condition_mode": "add",  # scale-shift (AdaGN) conditioning: measured worse (docs/benchmarks.md, "Tried and dropped")
    "dropout": 0.0,  # UNet dropout: no preset and no measurement ever set it
    "null_condition": False,  # classifier-free guidance's null condition: measured worse (docs/benchmarks.md, "Tried and dropped")
}


def retire_options(config: dict[str, Any], where: str | Path) -> dict[str, Any]:
    """`config` without the retired options it holds at their kept value; ValueError naming `where`
    for one that holds another value (that model needs the release that trained it)."""
    config = dict(config)
    for key, kept in RETIRED_OPTIONS.items():
        if key in config and config.pop(key) != kept:
            raise ValueError(
                f"{where}: {key} was removed from patronus (only {kept!r} remains); this model needs the release that trained it"
            )
    return config


def _net_from_config(config: dict[str, Any], where: Path) -> PatronusModel:
    """PatronusModel(**config) with a wrong field or type reported against the file it came from."""
    config = retire_options(config, where)
    _, unused, _ = PatronusModel.extract_init_dict(dict(config))
    unknown = [k for k in unused if not k.startswith("_")]
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)} for PatronusModel")
    try:
        return PatronusModel.from_config(dict(config))
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
        raise ValueError(f"{where}: the model config does not build a PatronusModel ({type(e).__name__}: {e})") from None


def _from_lightning_ckpt(path: Path) -> PatronusModel:
    ckpt = load_torch_file(path, "Lightning checkpoint (safe weights_only load)")
    if not isinstance(ckpt, dict) or "net_config" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path}: checkpoint has no 'net_config'/'state_dict'; was it written by patronus?")
    net = _net_from_config(ckpt["net_config"], path)
    # With EMA on, Lightning's WeightAveraging stores the averaged weights as "state_dict".
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    check_finite(state, str(path))
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: its weights do not fit its own net_config ({str(e).splitlines()[-1].strip()})") from None
    return net


def load_model(path: str | Path, device: str | torch.device = "cpu") -> PatronusModel:
    """A model for sampling/analysis from a run dir, an exported dir or a .ckpt file (eval mode)."""
    path = resolve_checkpoint(path)
    if path.is_dir():
        config_file = path / PatronusModel.config_name
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_file}: not valid JSON ({e}); expected the model config save_pretrained writes") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_file}: expected a JSON object of model fields, got {type(config).__name__}")
        _net_from_config(config, config_file)  # names a wrong field or type before diffusers sees it
        try:
            net = PatronusModel.from_pretrained(path, use_safetensors=True, low_cpu_mem_usage=False)
        except (OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: cannot load the exported weights ({str(e).strip().splitlines()[0]})") from None
        weights = next(path.glob("*.safetensors"), path)
        check_finite(net.state_dict(), str(weights))
    else:
        net = _from_lightning_ckpt(path)
    return net.to(device).eval()


def prior_dir(checkpoint: str | Path) -> Path:
    """Where the activation prior of a checkpoint is saved (`python -m patronus prior`)."""
    return home_of(checkpoint) / PRIOR_DIR


def encoder_digest(model: PatronusModel) -> str:
    """sha1 of the prototype encoder's weights and buffers: what makes `s`, so what an activation
    prior was fitted to (the same whichever file of the run the model was loaded from)."""
    h = hashlib.sha1()
    for name, value in sorted(model.encoder.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def save_prior(checkpoint: str | Path, prior: ActivationPrior, model: PatronusModel) -> Path:
    """Save a checkpoint's activation prior beside it, with the digest of the encoder it was fitted to."""
    folder = prior_dir(checkpoint)
    prior.save_pretrained(folder, safe_serialization=True)
    atomic_write(folder / PRIOR_ENCODER_FILE, lambda fh: fh.write(encoder_digest(model).encode()))
    return folder


def load_prior(checkpoint: str | Path, model: Optional[PatronusModel] = None) -> ActivationPrior:
    """The trained activation prior of a checkpoint, with a clear error when there is none yet and a
    warning when `model`'s encoder is not the one it was fitted to (the run was trained since)."""
    folder = prior_dir(checkpoint)
    if not (folder / ActivationPrior.config_name).is_file():
        raise FileNotFoundError(f"{folder}: no trained activation prior; run `python -m patronus prior --checkpoint {checkpoint}` first")
    digest = folder / PRIOR_ENCODER_FILE
    if model is not None and digest.is_file() and digest.read_text().strip() != encoder_digest(model):
        warnings.warn(
            f"{folder}: this activation prior was fitted to another version of the run's encoder (the run was trained "
            f"since), so its activations no longer match the model's; retrain it: `python -m patronus prior --checkpoint {checkpoint}`",
            stacklevel=2,
        )
    return ActivationPrior.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False).eval()


def weights_fingerprint(checkpoint: str | Path) -> list[list[Any]]:
    """[name, size, mtime_ns] of each file the checkpoint's weights are read from (a .ckpt, or an
    exported model's files): cached results of one checkpoint are never served for another, nor
    for the same path after it was trained further or re-trained."""
    path = resolve_checkpoint(checkpoint)
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _with_weights(checkpoint: str | Path, source: dict[str, Any]) -> dict[str, Any]:
    """`source` and the checkpoint's `weights_fingerprint`: what cached statistics are keyed by and stored with."""
    return {**source, "weights": weights_fingerprint(checkpoint)}


def _statistics_file(checkpoint: str | Path, keyed_source: dict[str, Any]) -> Path:
    key = hashlib.sha1(json.dumps(keyed_source, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return home_of(checkpoint) / STATS_DIR / f"{key}.json"


def statistics_path(checkpoint: str | Path, source: dict[str, Any]) -> Path:
    """The cache file for activation statistics computed on `source` (dataset, root, split, options,
    number of images) with the checkpoint's weights: one file per source and weights, so commands
    with the same source share it and others never overwrite it."""
    return _statistics_file(checkpoint, _with_weights(checkpoint, source))


def cached_statistics(
    checkpoint: str | Path,
    source: dict[str, Any],
    compute: Callable[[], dict[str, Any]],
    num_prototypes: Optional[int] = None,
    keys: Sequence[str] = (),
) -> dict[str, Any]:
    """Statistics for `source`, computed by `compute()` once and stored with what they were computed on:
    the images (`source`) and the weights (`weights_fingerprint`; another checkpoint of the same run,
    or the run trained further, gets its own file). A stored file without one of `keys` (written by
    an older release) is recomputed."""
    source = _with_weights(checkpoint, source)  # the key, stored, and compared on a hit
    cache = _statistics_file(checkpoint, source)
    if cache.is_file():
        try:
            stored = json.loads(cache.read_text())
        except json.JSONDecodeError:  # a damaged cache is recomputed, never trusted
            stored = {}
        if (
            stored.get("source") == source
            and (num_prototypes is None or len(stored.get("mean", [])) == num_prototypes)
            and all(k in stored for k in keys)
        ):
            return stored
    stats = {"source": source, **compute()}
    atomic_write(cache, lambda fh: fh.write(json.dumps(stats, indent=1).encode()))
    return stats


@dataclass
class ResumePoint:
    """The checkpoint a re-run continues from, and what was passed over on the way (for the log)."""

    path: Optional[Path]  # None: start from scratch
    step: int = 0
    net_config: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # one "FILE: why" per checkpoint not taken

    def describe(self) -> str:
        head = f"resuming from {self.path} (step {self.step})" if self.path else "no loadable checkpoint: starting from step 0"
        return head + "".join(f"\n  skipped {s}" for s in self.skipped)


def _move_aside(path: Path) -> Path:
    """Move an unreadable checkpoint to checkpoints/corrupt/ (a new name if taken): out of the way of
    Lightning and of the next resume, but kept for the user to inspect."""
    target_dir = path.parent / CORRUPT_DIR
    target_dir.mkdir(exist_ok=True)
    target, n = target_dir / path.name, 1
    while target.exists():
        target, n = target_dir / f"{path.stem}.{n}{path.suffix}", n + 1
    os.replace(path, target)
    return target


def find_resume_point(run_dir: str | Path) -> ResumePoint:
    """The newest checkpoint of RUN/checkpoints that loads (weights_only, finite weights).

    "Newest" is the highest global step, not the name: a kill between writing step*.ckpt and
    updating last.ckpt leaves the step file ahead. Unreadable files (a kill during a copy) are
    moved to checkpoints/corrupt/; stale temporary files of killed writes are removed.
    """
    folder = Path(run_dir) / CHECKPOINT_DIR
    remove_stale_temporaries(folder)
    remove_stale_temporaries(Path(run_dir))
    found: list[tuple[int, bool, Path, dict[str, Any]]] = []
    skipped: list[str] = []
    for path in sorted(folder.glob("*.ckpt")) if folder.is_dir() else []:
        try:
            ckpt = load_torch_file(path, "checkpoint", mmap=True)
            if not isinstance(ckpt, dict) or "global_step" not in ckpt or "state_dict" not in ckpt:
                raise ValueError(f"{path}: not a Lightning training checkpoint (no global_step/state_dict)")
            bad = non_finite({**ckpt["state_dict"], **ckpt.get("current_model_state", {})})
            if bad:
                skipped.append(f"{path}: holds NaN/inf weights ({len(bad)} tensors), kept in place")
                continue
        except ValueError as e:
            skipped.append(f"{str(e)}; moved to {_move_aside(path)}")
            continue
        found.append((int(ckpt["global_step"]), path.name == LAST_CKPT.name, path, dict(ckpt.get("net_config") or {})))
        del ckpt
    if not found:
        return ResumePoint(None, skipped=skipped)
    found.sort(key=lambda f: (f[0], f[1]))  # highest step; on a tie last.ckpt
    step, _, path, config = found[-1]
    skipped += [f"{p}: older (step {s})" for s, _, p, _ in found[:-1] if s < step]
    return ResumePoint(path, step, config, skipped)
