"""Cost of the interpretability monitor (InterpretMonitor) as a fraction of training time.

    python benchmarks/monitor_cost.py [--compare]      # ~1 min alone on 2 cores (2 with --compare)

One short real run of the default preset (configs/mnist_cpu.yaml: same model, data, batch 64,
bf16, offline wandb logger) through the same CLI as train.py, with a probe every `--every`
steps. Every training step and every probe is timed in that same run, interleaved, so a busy
machine slows both alike; medians are robust to the odd preempted step. Extrapolated to the
default run (the preset's max_steps and monitor interval):

    fraction = P·c / (max_steps·step + P·c),   P = max_steps // every_n_steps

with c the median seconds per probe (the first one also loads the image pool) and step the
median seconds per training step. Validation and checkpoints of the default run are left out
of its time, so this slightly overstates the fraction. `--compare` adds a second run with the
monitor off and reports (with − without) / with, which is only meaningful on an idle machine.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
import yaml

from patronus.cli.train import PatronusCLI
from patronus.training.callbacks import InterpretMonitor

PRESET = Path("configs/mnist_cpu.yaml")


class StepTimer(pl.Callback):
    """Per training step: wall seconds from batch start to the next batch start, and the part of
    it the monitor spent (its `seconds` counter before and after). Runs after the monitor."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.monitor: Optional[InterpretMonitor] = None
        self.steps: list[float] = []  # seconds per step, probes excluded
        self.probes: list[float] = []  # seconds per probe
        self.wall = 0.0  # timed window, probes included
        self._t: Optional[float] = None
        self._m = 0.0

    def on_train_start(self, trainer, pl_module):
        self.monitor = next((c for c in trainer.callbacks if isinstance(c, InterpretMonitor)), None)

    def _spent(self) -> float:
        return self.monitor.seconds if self.monitor is not None else 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._close(trainer.global_step)

    def on_train_end(self, trainer, pl_module):
        self._close(trainer.global_step)

    def _close(self, step: int) -> None:
        now, spent = time.perf_counter(), self._spent()
        if self._t is not None:
            probe = spent - self._m
            self.steps.append(now - self._t - probe)
            self.wall += now - self._t
            if probe > 0:
                self.probes.append(probe)
        if step >= self.warmup:  # the first steps warm up oneDNN's kernels
            self._t, self._m = now, spent


def timed_run(steps: int, every: int, warmup: int) -> StepTimer:
    with tempfile.TemporaryDirectory() as run:
        cli = PatronusCLI(
            args=[
                "--config",
                str(PRESET),
                "--run_dir",
                run,
                "--logger",
                "wandb",
                "--trainer.max_steps",
                str(steps),
                "--trainer.limit_val_batches",
                "0",
                "--checkpoint.save_last",
                "false",
                "--trainer.enable_progress_bar",
                "false",
                "--interpret_monitor.every_n_steps",
                str(every),
            ]
        )
        timer = StepTimer(warmup)
        cli.trainer.callbacks.append(timer)  # last: its on_train_batch_end follows the monitor's probe
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=68)
    p.add_argument("--every", type=int, default=10, help="probe interval of the measured run")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--compare", action="store_true", help="also train with the monitor off and compare wall times")
    p.add_argument("--out", default="benchmarks/monitor_cost.json")
    a = p.parse_args()
    wandb_dir = Path(tempfile.mkdtemp(prefix="wandb-bench-"))  # keep wandb out of ~/.local and ~/.cache
    for key in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        os.environ.setdefault(key, str(wandb_dir))
    os.environ.setdefault("WANDB_SILENT", "true")

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    on = timed_run(a.steps, a.every, a.warmup)
    off = timed_run(a.steps, 0, a.warmup) if a.compare else None
    load_after = os.getloadavg()[0]

    defaults = {k: v.default for k, v in inspect.signature(InterpretMonitor).parameters.items()}
    preset = yaml.safe_load(PRESET.read_text())
    max_steps = preset["trainer"]["max_steps"]
    every = preset.get("interpret_monitor", {}).get("every_n_steps", defaults["every_n_steps"])
    n = max_steps // every

    def default_fraction(probe: float, step: float) -> dict:
        return {
            "probe_seconds": round(n * probe, 2),
            "train_seconds": round(max_steps * step, 1),
            "cost_fraction": round(n * probe / (max_steps * step + n * probe), 4),
        }

    step_med, probe_med = statistics.median(on.steps), statistics.median(on.probes)
    result = {
        "preset": str(PRESET),
        "logger": "wandb (offline)",
        "measured_run": {
            "steps": a.steps,
            "timed_steps": len(on.steps),
            "probe_every": a.every,
            "probes": len(on.probes),
            "step_s_median": round(step_med, 4),
            "step_s_min": round(min(on.steps), 4),
            "probe_s_each": [round(x, 3) for x in on.probes],
            "probe_s_median": round(probe_med, 3),
            "probe_in_steps": round(probe_med / step_med, 2),
            "cost_fraction": round(sum(on.probes) / on.wall, 4),
        },
        "default_run": {
            "max_steps": max_steps,
            "every_n_steps": every,
            "probes": n,
            **default_fraction(probe_med, step_med),
            "cost_fraction_from_minimums": default_fraction(min(on.probes), min(on.steps))["cost_fraction"],
        },
        "monitor_defaults": defaults,
        "loadavg_1min_before_after": [round(load_before, 2), round(load_after, 2)],
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "processor": platform.processor(),
            "torch": torch.__version__,
        },
    }
    if off is not None:
        result["compare"] = {
            "with_s": round(on.wall, 2),
            "without_s": round(off.wall, 2),
            "fraction": round((on.wall - off.wall) / on.wall, 4),
        }
    print(json.dumps(result, indent=2))
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
