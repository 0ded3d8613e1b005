"""`train.py`: the LightningCLI over PatronusModule + PatronusDataModule, with a run directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from patronus.data.datamodule import PatronusDataModule
from patronus.runs import CHECKPOINT_DIR, LAST_CKPT, MODEL_DIR, export_model
from patronus.training.callbacks import EMA, InterpretMonitor, SampleGrid, StatusLine
from patronus.training.module import PatronusModule

LoggerKind = Literal["wandb", "csv", "tensorboard", "none"]


class SaveConfigToLoggers(SaveConfigCallback):
    """Writes RUN/config.yaml (the resolved config) and sends the same config to the loggers."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config.clone().as_dict())


def make_logger(kind: LoggerKind, run_dir: str, project: str, online: bool) -> Optional[Logger]:
    """wandb is offline unless asked (no account, no prompt; `wandb sync RUN/wandb/offline-*` later)."""
    if kind == "wandb":
        return WandbLogger(save_dir=run_dir, project=project, offline=not online, log_model=False)
    if kind == "csv":
        return CSVLogger(save_dir=run_dir, name="", version="")
    if kind == "tensorboard":
        return TensorBoardLogger(save_dir=run_dir, name="", version="")
    return None


def cpu_has_native_bf16() -> bool:
    """bf16 autocast doubles CPU throughput with AVX512-BF16/AMX, and is emulated (slow) without."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: let torch decide
        return True
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


class PatronusCLI(LightningCLI):
    """LightningCLI with a run directory: config, checkpoints, samples, logs and the export live there."""

    def __init__(self, args: Optional[list[str]] = None, **kwargs: Any):
        super().__init__(
            PatronusModule,
            PatronusDataModule,
            save_config_callback=SaveConfigToLoggers,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            run=False,
            args=args,
            auto_configure_optimizers=False,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", type=str, default="runs/default", help="where everything of this run goes")
        parser.add_argument("--logger", type=LoggerKind, default="wandb", help="wandb (offline), csv, tensorboard, none")
        parser.add_argument("--wandb_project", type=str, default="patronus")
        parser.add_argument("--wandb_online", type=bool, default=False, help="stream to wandb (needs an account)")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.filename": "step{step:07d}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.every_n_train_steps": 200,
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
            }
        )
        parser.link_arguments("run_dir", "checkpoint.dirpath", compute_fn=lambda d: str(Path(d) / CHECKPOINT_DIR))
        parser.link_arguments("run_dir", "trainer.default_root_dir")
        parser.add_lightning_class_args(EMA, "ema", required=False)
        parser.add_lightning_class_args(StatusLine, "status")
        parser.add_lightning_class_args(SampleGrid, "sample_grid")
        parser.add_lightning_class_args(InterpretMonitor, "interpret_monitor")  # after EMA: probes its current copy

    def before_instantiate_classes(self) -> None:
        t = self.config["trainer"]
        if t.get("accelerator") == "cpu" and str(t.get("precision")) == "bf16-mixed" and not cpu_has_native_bf16():
            rank_zero_warn("this CPU has no native bf16 (avx512_bf16/amx): training in fp32 instead of bf16-mixed")
            t["precision"] = "32-true"

    def instantiate_classes(self) -> None:
        # Values that type-check but that a constructor rejects still get a usage error, not a traceback.
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as e:
            self.parser.error(str(e))

    def instantiate_trainer(self, **kwargs: Any):
        c = self.config_init
        if c["trainer"].get("logger") in (None, True):  # not set explicitly in the config
            kwargs["logger"] = make_logger(c["logger"], c["run_dir"], c["wandb_project"], c["wandb_online"]) or False
        return super().instantiate_trainer(**kwargs)


def train_main(args: Optional[list[str]] = None) -> PatronusCLI:
    """`python train.py --config configs/X.yaml [overrides]`; re-running the same command resumes."""
    cli = PatronusCLI(args=args)
    run_dir = Path(cli.config_init["run_dir"])
    last = run_dir / LAST_CKPT
    ckpt = str(last) if last.is_file() else None
    if ckpt:
        rank_zero_info(f"resuming from {ckpt}")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, weights_only=True)
    if cli.trainer.is_global_zero:
        out = export_model(cli.model.net, run_dir / MODEL_DIR)
        rank_zero_info(f"exported model to {out}")
    return cli


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    train_main()
