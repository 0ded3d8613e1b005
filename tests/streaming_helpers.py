"""Test-only callbacks that `train.py` subprocesses load by class path (`--trainer.callbacks+=tests.streaming_helpers.X`):
what each rank trained on, and the weights it ended with."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


class RecordSamples(pl.Callback):
    """Appends one JSON line per training batch to FOLDER/ids-rank<R>.jsonl: the step it is trained
    at and the prepared rows it holds (flushed at once, so a killed run leaves what it trained on)."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        line = {
            "step": trainer.global_step,
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "epoch": trainer.current_epoch,
            "ids": batch["index"].tolist(),
        }
        with open(Path(self.folder) / f"ids-rank{trainer.global_rank}.jsonl", "a") as fh:
            fh.write(json.dumps(line) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


class SaveWeights(pl.Callback):
    """Each rank's final state in FOLDER/weights-rank<R>.pt, parameters and buffers apart (compared across ranks)."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = {k: v.detach().cpu().clone() for k, v in pl_module.named_parameters()}
        buffers = {k: v.detach().cpu().clone() for k, v in pl_module.named_buffers()}
        torch.save({"parameters": params, "buffers": buffers}, Path(self.folder) / f"weights-rank{trainer.global_rank}.pt")


def read_ids(folder: Path) -> list[dict[str, Any]]:
    """Every line every rank recorded in `folder`."""
    return [json.loads(line) for f in sorted(Path(folder).glob("ids-rank*.jsonl")) for line in f.read_text().splitlines() if line]


class PoisonBatch(pl.Callback):
    """Turns one image NaN on one rank at one step: only that rank's loss diverges, yet every rank
    must stop together (a rank left alone would wait in the next all-reduce forever)."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            batch["image"][0] = float("nan")
