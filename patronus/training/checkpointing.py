"""Checkpoints a run can trust: atomic writes on the run's own filesystem, never non-finite
weights, the final step always saved, and a stop on divergence that names the step and the cause."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from patronus.runs import atomic_write, non_finite


class TrainingDiverged(ValueError):
    """Loss or weights became NaN/inf: stop, keep the last good checkpoint, export nothing."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file beside the target, fsync, `os.replace`.

    Lightning's own save goes through fsspec, which stages the file in the system temporary folder
    and *moves* it: across filesystems (node-local /tmp, runs on network storage) that is a copy a
    kill can cut short, leaving a truncated last.ckpt. Non-finite weights are refused, so a
    diverged step never replaces the last good checkpoint.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        bad = non_finite({**checkpoint.get("state_dict", {}), **checkpoint.get("current_model_state", {})})
        if bad:
            raise TrainingDiverged(
                f"step {checkpoint.get('global_step')}: {len(bad)} weight tensors are NaN/inf (e.g. {bad[:3]}), so "
                f"{path} was not written and the last good checkpoint is kept; the learning rate (model.lr) is likely too high"
            )
        atomic_write(path, lambda fh: torch.save(checkpoint, fh))


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also saves the final step, so a finished run re-run unchanged has
    nothing left to do (max_steps need not be a multiple of every_n_train_steps)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # At batch end, after EMA's update and before it copies the average into the model on train end.
        if 0 < trainer.max_steps <= trainer.global_step and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)


def check_finite_loss(module: pl.LightningModule, loss: torch.Tensor) -> None:
    """Raise TrainingDiverged when the loss is NaN/inf on any rank (all ranks stop together)."""
    finite = bool(torch.isfinite(loss.detach()).all())
    world = module.trainer.world_size
    if world > 1:  # one collective: which ranks diverged, so every rank stops and names the same ones
        flags = module.trainer.strategy.all_gather(torch.tensor([float(finite)], device=loss.device))  # (world, 1)
        bad = [r for r, ok in enumerate(flags.flatten().tolist()) if not ok]
        value = f"NaN/inf on rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} of {world}"
    else:
        bad, value = ([] if finite else [0]), str(float(loss.detach().float().mean()))
    if not bad:
        return
    lr = f" at learning rate {module.trainer.optimizers[0].param_groups[0]['lr']:.3g}" if module.trainer.optimizers else ""
    raise TrainingDiverged(
        f"training diverged at step {module.trainer.global_step}: the loss is "
        f"{value}{lr}; the learning rate is likely too high: start again with a lower "
        "model.lr or more model.warmup_steps in a new --run_dir (the last good checkpoint is kept; nothing was exported)"
    )
