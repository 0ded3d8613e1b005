"""Read an offline wandb run back as a reviewer's browser would get it after `wandb sync`: its
record stream (history rows, summary, config, artifacts) and its media files.

The `.wandb` file is a LevelDB-style log (wandb's datastore): a 7-byte header (":W&B", magic,
version), then 32 KiB blocks of records, each with a 7-byte header (CRC, little-endian length,
type: 1 full, 2 first, 3 middle, 4 last) holding one serialised `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768


def records(path: Path) -> Iterator[pb.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a wandb datastore"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield pb.Record.FromString(payload)
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            yield pb.Record.FromString(pending + payload)


def _put(target: dict[str, Any], item: Any) -> None:
    """An update item into `target`: a plain key, or a nested key path (["interpret/gallery", "captions"])."""
    path = [item.key] if item.key else list(item.nested_key)
    for k in path[:-1]:
        if not isinstance(target.get(k), dict):  # a later update of the key as an object replaces a plain value
            target[k] = {}
        target = target[k]
    target[path[-1]] = json.loads(item.value_json)


@dataclass
class OfflineRun:
    folder: Path
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per logged row
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    group: str = ""
    job_type: str = ""
    run_id: str = ""
    artifacts: list[str] = field(default_factory=list)  # "name:type"
    # per artifact record, in order: {path in the artifact: the staged local file}. wandb keeps a
    # table with image cells as an artifact staged under WANDB_DATA_DIR until `wandb sync`.
    artifact_files: list[dict[str, Path]] = field(default_factory=list)

    @property
    def files(self) -> Path:
        return self.folder / "files"


def read_run(folder: Path) -> OfflineRun:
    folder = Path(folder)
    run = OfflineRun(folder)
    (store,) = folder.glob("run-*.wandb")
    for r in records(store):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row: dict[str, Any] = {}
            for i in r.history.item:
                _put(row, i)
            run.history.append(row)
        elif kind == "summary":
            for i in r.summary.update:
                _put(run.summary, i)
        elif kind == "config":
            for i in r.config.update:
                _put(run.config, i)
        elif kind == "run":  # the run record carries the config given to wandb.init
            run.group, run.job_type, run.run_id = r.run.run_group, r.run.job_type, r.run.run_id
            for i in r.run.config.update:
                _put(run.config, i)
        elif kind == "artifact":
            run.artifacts.append(f"{r.artifact.name}:{r.artifact.type}")
            run.artifact_files.append({e.path: Path(e.local_path) for e in r.artifact.manifest.contents})
    return run
