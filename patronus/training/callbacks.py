"""Lightning callbacks: EMA with warmup, a human status line, sample grids from a fixed batch,
and the interpretability probe logged during training."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from safetensors.torch import save_file
from torchvision.utils import save_image

from patronus import plots
from patronus.pipeline import PatronusPipeline
from patronus.runs import MONITOR_DIR, SAMPLES_DIR

if TYPE_CHECKING:
    from patronus.interpret.monitor import ProbeResult


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
        pipe = PatronusPipeline(model=pl_module.net)  # eval, no grad, fp32 (outside the training autocast)
        samples = pipe.sample(pipe.encode(refs).s, pipe.noise(refs.shape, seed=self.seed), steps=self.ddim_steps)
        grid = plots.reference_grid(refs, samples)
        out = Path(trainer.default_root_dir) / SAMPLES_DIR / f"step_{trainer.global_step:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, out)
        log_images(trainer, {"samples/reference_vs_ddim": grid})


def log_images(trainer: pl.Trainer, images: dict[str, torch.Tensor]) -> None:
    """(3, H, W) images (float in [0, 1] or uint8) to wandb / TensorBoard at the current step."""
    for key, img in images.items():
        img = img.float() / 255 if img.dtype == torch.uint8 else img  # one convention for every logger: [0, 1]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key, [img], step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(key, img, trainer.global_step)


def averaged_net(trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.nn.Module:
    """The EMA copy of `pl_module.net` when a WeightAveraging callback (our EMA) holds one, else the live net.

    Lightning swaps the averaged weights in only around validation; outside it they live in the
    callback's AveragedModel (`_average_model`, not public API), which is read here, never written.
    """
    for cb in trainer.callbacks:
        avg = getattr(cb, "_average_model", None) if isinstance(cb, WeightAveraging) else None
        if avg is not None:
            return avg.module.net
    return pl_module.net


class InterpretMonitor(pl.Callback):
    """Every N training steps, the interpretability probe (issue 5 §2) on fixed real images.

    Logs (rank 0; to wandb / TensorBoard and to RUN/interpret/step_XXXXXXX/): the prototype ×
    timestep heatmap of a `ddim_steps` DDIM decode of the probe batch under its own s (x̂0(t)
    re-encoded at every step, `patronus.interpret.emergence`); per-prototype activation
    histograms over a pool of real validation images; references vs those DDIM samples; each
    prototype's top-k nearest pool patches with receptive-field boxes (ProtoPNet projection);
    per-prototype statistics (wandb table + stats.json); and its own cost,
    `interpret/cost_fraction` = seconds in this callback / seconds of training so far.

    Hook: on_train_batch_end at global_step % every_n_steps == 0, on the EMA weights read from
    the EMA callback's averaged copy (the live weights when there is no EMA). Unlike SampleGrid
    it does not hook into validation: it then keeps its own schedule (also with
    `limit_val_batches=0`) and still sees the weights that validation, checkpoints and the export
    use, not the noisier live ones. The EMA callback must come before it in the callback list
    (it does in the CLI) so the copy includes the current step. Probes run in fp32, outside
    autocast, like every analysis: the distances ‖z‖² − 2z·p + ‖p‖² cancel badly in bf16.

    Defaults: 3 probes in the 900-step default run, at the steps that also validate and
    checkpoint; one probe costs about 3.6 training steps, about 1.2% of the run
    (benchmarks/monitor_cost.py; budget 3%). `every_n_steps=0` turns it off.
    """

    def __init__(
        self,
        every_n_steps: int = 300,
        num_images: int = 8,
        ddim_steps: int = 10,
        pool_size: int = 256,
        top_k: int = 5,
        bins: int = 30,
        seed: int = 0,
    ):
        if every_n_steps < 0 or min(num_images, ddim_steps, pool_size, top_k, bins) < 1:
            raise ValueError("interpret_monitor: every_n_steps must be ≥ 0 and the sizes ≥ 1")
        self.every, self.num_images, self.ddim_steps = every_n_steps, num_images, ddim_steps
        self.pool_size, self.top_k, self.bins, self.seed = pool_size, top_k, bins, seed
        self._pool: Optional[torch.Tensor] = None
        self._t_start: Optional[float] = None
        self.seconds = 0.0  # wall time spent in this callback since training started
        self.probes = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t_start, self.seconds, self.probes = time.perf_counter(), 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self.every or trainer.global_step % self.every or self._t_start is None:
            return
        t0 = time.perf_counter()
        self._probe(trainer, pl_module)
        self.seconds += time.perf_counter() - t0
        self.probes += 1
        self._log_cost(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._t_start is None or not self.every:
            return
        frac, total = self.cost_fraction(), time.perf_counter() - self._t_start
        self._log_cost(trainer)
        rank_zero_info(
            f"interpret monitor: {self.probes} probes every {self.every} steps took {self.seconds:.1f} s of "
            f"{total:.1f} s training ({100 * frac:.2f}%)"
        )

    def cost_fraction(self) -> float:
        """Seconds in this callback / seconds since training started (the probes included)."""
        return self.seconds / max(time.perf_counter() - (self._t_start or 0.0), 1e-9)

    @rank_zero_only
    def _log_cost(self, trainer: pl.Trainer) -> None:
        for logger in trainer.loggers:
            logger.log_metrics({"interpret/cost_fraction": self.cost_fraction(), "interpret/seconds": self.seconds},
                               step=trainer.global_step)

    def _real_images(self, trainer: pl.Trainer) -> torch.Tensor:
        """The first `pool_size` validation images (training images if there is no validation data)."""
        loader = trainer.train_dataloader
        if trainer.datamodule is not None:
            try:
                loader = trainer.datamodule.val_dataloader()
            except MisconfigurationException:  # a datamodule without validation data
                pass
        images, n = [], 0
        for batch in loader:
            images.append(batch["image"])
            n += len(batch["image"])
            if n >= self.pool_size:
                break
        return torch.cat(images)[: self.pool_size]

    @rank_zero_only
    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from patronus.interpret.monitor import run_probe, stats_table

        if self._pool is None:
            self._pool = self._real_images(trainer)
        pool, step = self._pool, trainer.global_step
        # The pipeline runs the probe in eval mode, fp32, without gradients, and restores train mode.
        pipe = PatronusPipeline(model=averaged_net(trainer, pl_module))
        probe = pool[: self.num_images].to(pipe.device)
        x_T = pipe.noise(probe.shape, seed=self.seed)
        result = run_probe(pipe, probe, x_T, pool, self.ddim_steps, self.top_k, self.bins)
        rf = pipe.model.encoder.receptive_field()
        out = Path(trainer.default_root_dir) / MONITOR_DIR / f"step_{step:07d}"
        figures = write_probe(result, pool, probe.cpu(), x_T.cpu(), out, step,
                              {"size": rf.size, "jump": rf.jump, "start": rf.start, "image_size": rf.image_size})
        grid = plots.reference_grid(probe, result.decoded)
        save_image(grid, out / "samples.png")
        log_images(trainer, {**{f"interpret/{k}": v for k, v in figures.items()}, "interpret/samples": grid})
        columns, rows = stats_table(result.stats)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.log_table("interpret/prototype_stats", columns=columns, data=rows, step=step)
                logger.log_metrics({f"interpret/hist/p{j}": wandb.Histogram(np_histogram=(c.numpy(), e.numpy()))
                                    for j, (c, e) in enumerate(result.hists)}, step=step)
            elif isinstance(logger, TensorBoardLogger):
                for j, col in enumerate(result.pool_activations.T):
                    logger.experiment.add_histogram(f"interpret/hist/p{j}", col, step, bins=self.bins)


def write_probe(result: "ProbeResult", pool: torch.Tensor, x0: torch.Tensor, x_T: torch.Tensor, out: Path,
                step: Optional[int] = None, receptive_field: Optional[dict[str, Any]] = None) -> dict[str, torch.Tensor]:
    """Figures (PNG) and numbers (JSON, safetensors) of one probe under `out`; returns the figures
    as uint8 (3, H, W) tensors keyed by name, ready for the loggers."""
    out.mkdir(parents=True, exist_ok=True)
    at = f" (step {step})" if step is not None else ""
    K = result.heatmap.shape[0]
    figures = {
        "heatmap": plots.emergence_heatmap(result.heatmap, result.timesteps, f"s(x̂0(t)) − s(x0), DDIM from s{at}",
                                     out / "heatmap.png", [f"p{j}" for j in range(K)]),
        "histograms": plots.histogram_figure(result.hists, f"activations over {len(pool)} real images{at}", out / "histograms.png"),
        "gallery": plots.patch_gallery(pool, result.hits),
    }
    plots.save_png(figures["gallery"], out / "gallery.png")
    tensors = {"heatmap": result.heatmap, "timesteps": result.timesteps, "activations": result.activations,
               "s_ref": result.s_ref, "x0": x0, "x_T": x_T, "decoded": result.decoded, "pool_activations": result.pool_activations}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / "probe.safetensors"))
    (out / "stats.json").write_text(json.dumps({"step": step, **result.stats}, indent=1))
    gallery = {"step": step, "receptive_field": receptive_field, "hits": [[asdict(h) for h in row] for row in result.hits]}
    (out / "gallery.json").write_text(json.dumps(gallery))
    return figures
