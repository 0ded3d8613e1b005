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

    def __init__(self, num_images: int = 8, steps: int = 20, seed: int = 0):
        self.num_images, self.steps, self.seed = num_images, steps, seed

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and not trainer.sanity_checking:
            self._log_grid(trainer, pl_module, batch["image"][: self.num_images])

    @rank_zero_only
    def _log_grid(self, trainer: pl.Trainer, pl_module: pl.LightningModule, refs: torch.Tensor) -> None:
        pipe = PatronusPipeline(model=pl_module.net)  # eval, no grad, fp32 (outside the training autocast)
        samples = pipe.sample(pipe.encode(refs).s, pipe.noise(refs.shape, seed=self.seed), steps=self.steps)
        grid = plots.reference_grid(refs, samples)
        out = Path(trainer.default_root_dir) / SAMPLES_DIR / f"step_{trainer.global_step:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        plots.save_png(grid, out)
        caption = f"step {trainer.global_step}: row 1 references, row 2 {self.steps}-step DDIM samples from their s"
        log_images(trainer, {"samples/reference_vs_ddim": grid}, {"samples/reference_vs_ddim": caption})


def log_images(trainer: pl.Trainer, images: dict[str, torch.Tensor], captions: Optional[dict[str, str]] = None) -> None:
    """uint8 (3, H, W) pictures (the PNGs' pixels) to wandb / TensorBoard at the current step.

    Loggers get uint8 only: how a logger reads a float image is its version's choice (wandb 0.31
    casts floats to uint8 without rescaling, which turned every [0, 1] picture black)."""
    captions = captions or {}
    for key, img in images.items():
        if img.dtype != torch.uint8 or img.ndim != 3:
            raise TypeError(f"log_images: {key!r} is {img.dtype} {tuple(img.shape)}; expected a uint8 (C, H, W) picture")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                hwc = img.permute(1, 2, 0).cpu().numpy()
                logger.log_image(key, [hwc], step=trainer.global_step, **({"caption": [captions[key]]} if key in captions else {}))
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(key, img.cpu(), trainer.global_step, dataformats="CHW")


def validation_images(trainer: pl.Trainer, n: int) -> torch.Tensor:
    """The first n validation images (training images if there is no validation data)."""
    loader = trainer.train_dataloader
    if trainer.datamodule is not None:
        try:
            loader = trainer.datamodule.val_dataloader()
        except MisconfigurationException:  # a datamodule without validation data
            pass
    images, got = [], 0
    for batch in loader:
        images.append(batch["image"])
        got += len(batch["image"])
        if got >= n:
            break
    return torch.cat(images)[:n]


class RunSummary(pl.Callback):
    """At the end of training, the run's headline numbers into every logger (wandb: the run summary):
    `summary/reconstruction_psnr_db` (DDIM inversion → decode of the first validation images, the
    EMA weights, as `sample.py` measures it), `summary/img_per_s` over the whole run, `summary/steps`.
    A reviewer sorting runs in wandb sees them without opening a file. `num_images=0` turns it off."""

    def __init__(self, num_images: int = 8, steps: int = 50):
        if num_images < 0 or steps < 1:
            raise ValueError("run_summary: num_images must be >= 0 and steps >= 1")
        self.num_images, self.steps = num_images, steps
        self._t0: Optional[float] = None
        self._images = 0
        self.summary: dict[str, float] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0, self._images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._images += batch["image"].shape[0] * trainer.world_size

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.num_images and self._t0 is not None:
            self._write(trainer, pl_module, self._images / max(time.perf_counter() - self._t0, 1e-9))

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rate: float) -> None:
        from patronus.interpret.generation_metrics import psnr

        refs = validation_images(trainer, self.num_images)
        pipe = PatronusPipeline(model=averaged_net(trainer, pl_module))
        _, recon = pipe.reconstruct(refs.to(pipe.device), self.steps)
        scores = psnr(recon.cpu(), refs)
        self.summary = {
            "summary/reconstruction_psnr_db": sum(scores) / len(scores),
            "summary/img_per_s": rate,
            "summary/steps": float(trainer.global_step),
        }
        rank_zero_info(
            f"run summary: reconstruction {self.summary['summary/reconstruction_psnr_db']:.2f} dB PSNR "
            f"({len(refs)} validation images, {self.steps} DDIM steps), {rate:.1f} img/s"
        )
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(self.summary)
            else:
                logger.log_metrics(self.summary, step=trainer.global_step)
                logger.save()


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
    timestep heatmap of a `steps`-step DDIM decode of the probe batch under its own s (x̂0(t)
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

    The default run (1,400 steps) probes every 350 steps, where it also validates and
    checkpoints; its cost against a budget of 3% of the run is measured by benchmarks/monitor_cost.py.
    `every_n_steps=0` turns it off.
    """

    def __init__(
        self,
        every_n_steps: int = 300,
        num_images: int = 8,
        steps: int = 10,
        pool_size: int = 256,
        top_k: int = 5,
        bins: int = 30,
        seed: int = 0,
    ):
        if every_n_steps < 0 or min(num_images, steps, pool_size, top_k, bins) < 1:
            raise ValueError("interpret_monitor: every_n_steps must be ≥ 0 and the sizes ≥ 1")
        self.every, self.num_images, self.steps = every_n_steps, num_images, steps
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
            logger.log_metrics(
                {"interpret/cost_fraction": self.cost_fraction(), "interpret/seconds": self.seconds}, step=trainer.global_step
            )

    @rank_zero_only
    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from patronus.interpret.emergence import emergence_times
        from patronus.interpret.monitor import run_probe, stats_table

        if self._pool is None:
            self._pool = validation_images(trainer, self.pool_size)
        pool, step = self._pool, trainer.global_step
        # The pipeline runs the probe in eval mode, fp32, without gradients, and restores train mode.
        pipe = PatronusPipeline(model=averaged_net(trainer, pl_module))
        probe = pool[: self.num_images].to(pipe.device)
        x_T = pipe.noise(probe.shape, seed=self.seed)
        result = run_probe(pipe, probe, x_T, pool, self.steps, self.top_k, self.bins)
        rf = pipe.model.encoder.receptive_field()
        out = Path(trainer.default_root_dir) / MONITOR_DIR / f"step_{step:07d}"
        figures = write_probe(
            result,
            pool,
            probe.cpu(),
            x_T.cpu(),
            out,
            step,
            {"size": rf.size, "jump": rf.jump, "start": rf.start, "image_size": rf.image_size},
        )
        grid = plots.reference_grid(probe, result.decoded)
        plots.save_png(grid, out / "samples.png")
        log_images(
            trainer,
            {**{f"interpret/{k}": v for k, v in figures.items()}, "interpret/samples": grid},
            {
                "interpret/samples": f"step {step}: row 1 probe images, row 2 {self.steps}-step DDIM decodes of their s",
                "interpret/heatmap": f"step {step}: s_J(x̂0(t)) − s_J(x0) per prototype (rows) and timestep (columns)",
                "interpret/histograms": f"step {step}: each prototype's activations over {len(pool)} real images",
                "interpret/gallery": f"step {step}: one row per prototype (p0 at the top), its {self.top_k} nearest "
                "real patches with receptive-field boxes",
            },
        )
        columns, rows = stats_table(result.stats)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                # One row per prototype, sortable in wandb: its statistics, when it emerges while
                # decoding, and its gallery row (nearest real patches with receptive-field boxes).
                emerges = emergence_times(result.timesteps, result.heatmap.T)
                tiles = [
                    wandb.Image(
                        plots.patch_gallery(pool, [hits]).permute(1, 2, 0).numpy(),
                        caption=f"p{j}: mean activation {result.stats['mean'][j]:.3g}",
                    )
                    for j, hits in enumerate(result.hits)
                ]
                data = [[*row, None if t != t else float(t), tile] for row, t, tile in zip(rows, emerges.tolist(), tiles)]
                logger.log_table("interpret/prototypes", columns=[*columns, "emerges_at_t", "gallery"], data=data, step=step)
                logger.log_metrics(
                    {f"interpret/hist/p{j}": wandb.Histogram(np_histogram=(c.numpy(), e.numpy())) for j, (c, e) in enumerate(result.hists)},
                    step=step,
                )
            elif isinstance(logger, TensorBoardLogger):
                for j, col in enumerate(result.pool_activations.T):
                    logger.experiment.add_histogram(f"interpret/hist/p{j}", col, step, bins=self.bins)


def write_probe(
    result: ProbeResult,
    pool: torch.Tensor,
    x0: torch.Tensor,
    x_T: torch.Tensor,
    out: Path,
    step: Optional[int] = None,
    receptive_field: Optional[dict[str, Any]] = None,
) -> dict[str, torch.Tensor]:
    """Figures (PNG) and numbers (JSON, safetensors) of one probe under `out`; returns the figures
    as uint8 (3, H, W) tensors keyed by name, ready for the loggers."""
    out.mkdir(parents=True, exist_ok=True)
    at = f" (step {step})" if step is not None else ""
    K = result.heatmap.shape[0]
    figures = {
        "heatmap": plots.emergence_heatmap(
            result.heatmap, result.timesteps, f"s(x̂0(t)) − s(x0), DDIM from s{at}", out / "heatmap.png", [f"p{j}" for j in range(K)]
        ),
        "histograms": plots.histogram_figure(result.hists, f"activations over {len(pool)} real images{at}", out / "histograms.png"),
        "gallery": plots.patch_gallery(pool, result.hits),
    }
    plots.save_png(figures["gallery"], out / "gallery.png")
    tensors = {
        "heatmap": result.heatmap,
        "timesteps": result.timesteps,
        "activations": result.activations,
        "s_ref": result.s_ref,
        "x0": x0,
        "x_T": x_T,
        "decoded": result.decoded,
        "pool_activations": result.pool_activations,
    }
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / "probe.safetensors"))
    (out / "stats.json").write_text(json.dumps({"step": step, **result.stats}, indent=1))
    gallery = {"step": step, "receptive_field": receptive_field, "hits": [[asdict(h) for h in row] for row in result.hits]}
    (out / "gallery.json").write_text(json.dumps(gallery))
    return figures
