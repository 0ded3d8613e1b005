"""Analyses logged beside the training run they audit: offline wandb runs in the run's group.

A training run logs into RUN/wandb/offline-run-<time>-<id>/. An analysis of one of its
checkpoints (sample.py, faithfulness, the shortcut report) opens its own offline run with
`group=<id>` and a `job_type` naming the analysis, so after `wandb sync RUN/wandb/offline-run-*
RUN/analysis/wandb/offline-run-*` the training run and every audit of it sit in one group of the
project (wandb's convention for jobs that belong together), each with its pictures and headline
numbers in its summary. Runs never need an account here: everything is offline until synced.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from patronus import runs

_RUN_DIR = re.compile(r"^(?:offline-)?run-\d{8}_\d{6}-(?P<id>[a-z0-9]+)$")


def training_run_id(checkpoint: str | Path) -> Optional[str]:
    """The wandb id of the newest wandb run in the checkpoint's run directory (None: not trained with wandb)."""
    folder = runs.home_of(checkpoint) / "wandb"
    found = sorted(p.name for p in folder.glob("*run-*") if p.is_dir() and _RUN_DIR.match(p.name)) if folder.is_dir() else []
    return _RUN_DIR.match(found[-1])["id"] if found else None


def linked_run(checkpoint: str | Path, job_type: str, config: dict[str, Any], project: str = "patronus"):
    """An offline wandb run in the group of the checkpoint's training run, under RUN/analysis/."""
    import wandb

    audited = training_run_id(checkpoint)
    folder = runs.analysis_dir(checkpoint)
    folder.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=project,
        dir=str(folder),
        mode="offline",
        job_type=job_type,
        group=audited,
        config={"checkpoint": str(checkpoint), "audited_run_id": audited, **config},
        reinit="create_new",
    )


def scalars(result: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every number, string and bool of a (nested) result dict, keyed by its path ("edits/raise/gain_mean");
    lists are left to the JSON file."""
    flat: dict[str, Any] = {}
    for k, v in result.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(scalars(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)):
            flat[key] = v
    return flat


def log_analysis(checkpoint: str | Path, job_type: str, result: dict[str, Any], out: Path) -> str:
    """An analysis' pictures (every PNG it wrote, pixels as on disk) and its numbers (the run summary)
    as a linked offline run; returns the run's folder."""
    import wandb

    run = linked_run(checkpoint, job_type, {"out": str(out)})
    pictures = {
        f"{job_type}/{p.stem}": wandb.Image(str(p), caption=f"{job_type}: {p.stem.replace('_', ' ')}")
        for p in sorted(Path(out).glob("*.png"))
    }
    if pictures:
        run.log(pictures)
    run.summary.update({f"{job_type}/{k}": v for k, v in scalars(result).items()})
    folder = run.dir
    run.finish()
    return folder


def wants_wandb(flag: Optional[bool], checkpoint: str | Path) -> bool:
    """--wandb: true / false, or unset = when the checkpoint's run was trained with wandb."""
    return flag if flag is not None else training_run_id(checkpoint) is not None
