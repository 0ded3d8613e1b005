"""Lightning callbacks: EMA with warmup, a human status line, sample grids from a fixed batch."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torchvision.utils import make_grid, save_image

from patronus.diffusion import ddim_sample


class EMA(WeightAveraging):
    """Exponential moving average of the weights, used for validation, checkpoints and export.

    The decay ramps up as min(decay, (1+n)/(10+n)) (n = updates so far), so short CPU runs are
    not dominated by the random initialisation.
    """

    def __init__(self, decay: float = 0.999, update_every_n_steps: int = 1):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema.decay={decay}; expected a value in (0, 1)")
        self.decay, self.every = decay, update_every_n_steps

        @torch.no_grad()
        def ema(avg: list[torch.Tensor], cur: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
            n = float(num_averaged)
            d = min(decay, (1 + n) / (10 + n))
            floats = [(a, c) for a, c in zip(avg, cur) if a.is_floating_point()]
            if floats:  # AveragedModel groups tensors by dtype: a group may hold only integers
                torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1 - d)
            for a, c in zip(avg, cur):  # integer buffers (BatchNorm's step count) are copied
                if not a.is_floating_point():
                    a.copy_(c)

        super().__init__(multi_avg_fn=ema, use_buffers=True)

    def should_update(self, step_idx: Optional[int] = None, epoch_idx: Optional[int] = None) -> bool:
        return step_idx is not None and step_idx % self.every == 0


class StatusLine(pl.Callback):
    """Every N steps, one line: step, loss, img/s (all ranks), memory — and img/s to the logger."""

    def __init__(self, every_n_steps: int = 50):
        self.every = every_n_steps
        self._t0: Optional[float] = None
        self._images = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._images += batch["image"].shape[0] * trainer.world_size
        step = trainer.global_step
        if step % self.every or self._t0 is None:
            return
        rate = self._images / (time.perf_counter() - self._t0)
        pl_module.log("train/img_per_s", rate, prog_bar=True, rank_zero_only=True)
        loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else _rss_gib()
        rank_zero_info(f"step {step:>6d} | loss {loss:.4f} | {rate:7.1f} img/s | mem {mem:.2f} GiB")
        self._t0, self._images = time.perf_counter(), 0


def _rss_gib() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except ImportError:  # pragma: no cover - non-POSIX
        return float("nan")


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] for image files and loggers."""
    return ((x.float() + 1) / 2).clamp(0, 1)


class SampleGrid(pl.Callback):
    """At each validation (EMA weights when EMA is on): references vs DDIM samples from their s.

    Few DDIM steps, never 1000-step DDPM inside training. Grids go to RUN/samples/ and to the
    logger, once (rank 0).
    """

    def __init__(self, num_images: int = 8, ddim_steps: int = 20, seed: int = 0):
        self.num_images, self.ddim_steps, self.seed = num_images, ddim_steps, seed

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and not trainer.sanity_checking:
            self._log_grid(trainer, pl_module, batch["image"][: self.num_images])

    @rank_zero_only
    def _log_grid(self, trainer: pl.Trainer, pl_module: pl.LightningModule, refs: torch.Tensor) -> None:
        net = pl_module.net
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        x_T = torch.randn(refs.shape, generator=gen).to(refs.device)
        with torch.no_grad():
            samples = ddim_sample(net, x_T, net.encode(refs), num_steps=self.ddim_steps)
        grid = make_grid(to_unit(torch.cat([refs, samples])), nrow=len(refs), padding=1)
        out = Path(trainer.default_root_dir) / "samples" / f"step_{trainer.global_step:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, out)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples/reference_vs_ddim", [grid], step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples/reference_vs_ddim", grid, trainer.global_step)
