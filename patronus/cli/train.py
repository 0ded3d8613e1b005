"""`train.py`: the LightningCLI over PatronusModule + PatronusDataModule, with a run directory."""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from patronus.cli.common import report_user_errors
from patronus.data.datamodule import PatronusDataModule
from patronus.models.patronus import PatronusModel
from patronus.runs import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    MODEL_DIR,
    ResumePoint,
    atomic_write,
    export_model,
    find_resume_point,
    load_model,
    retire_options,
)
from patronus.training.callbacks import EMA, InterpretMonitor, RunSummary, SampleGrid, StatusLine
from patronus.training.checkpointing import AtomicCheckpointIO, RunCheckpoint
from patronus.training.logs import AppendingCSVLogger, drop_rows_after
from patronus.training.module import PatronusModule
from patronus.training.reseeding import PrototypeReseeding

LoggerKind = Literal["wandb", "csv", "tensorboard", "none"]


class SaveConfigToLoggers(SaveConfigCallback):
    """Writes RUN/config.yaml (the resolved config, atomically) and sends it to the loggers — only
    once training starts, i.e. after a resume restored its checkpoint: a re-run that fails (say, on
    a changed architecture) leaves the run's config as it was."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        pass  # deferred to on_train_start

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            text = self.parser.dump(self.config, skip_none=False)
            atomic_write(Path(self.config["run_dir"]) / CONFIG_FILE, lambda fh: fh.write(text.encode()))
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config.clone().as_dict())


def make_logger(kind: LoggerKind, run_dir: str, project: str, online: bool) -> Optional[Logger]:
    """wandb is offline unless asked (no account, no prompt; `wandb sync RUN/wandb/offline-*` later)."""
    if kind == "wandb":
        return WandbLogger(save_dir=run_dir, project=project, offline=not online, log_model=False)
    if kind == "csv":
        return AppendingCSVLogger(save_dir=run_dir, name="", version="")
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

    def __init__(self, args: Optional[list[str]] = None, model_class: type[PatronusModule] = PatronusModule, **kwargs: Any):
        super().__init__(
            model_class,
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
        parser.add_argument(
            "--wandb_log_model",
            type=bool,
            default=False,
            help="also log the exported model (safetensors + config) as a wandb artifact of type 'model'",
        )
        parser.add_argument("--debug", type=bool, default=False, help="show the traceback of an error")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
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
        # The data is read at the size and channels the model is built for: one value, no mismatch.
        parser.link_arguments("model.net.init_args.image_size", "data.image_size")
        parser.link_arguments("model.net.init_args.in_channels", "data.channels")
        parser.add_lightning_class_args(EMA, "ema", required=False)
        parser.add_lightning_class_args(
            PrototypeReseeding, "reseed", subclass_mode=True, required=False
        )  # off unless a config has a reseed: block
        parser.add_lightning_class_args(StatusLine, "status")
        parser.add_lightning_class_args(SampleGrid, "sample_grid")
        parser.add_lightning_class_args(InterpretMonitor, "interpret_monitor")  # after EMA: probes its current copy
        parser.add_lightning_class_args(RunSummary, "run_summary")

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
        if not c["trainer"].get("plugins"):  # atomic checkpoint writes on the run's own filesystem
            kwargs["plugins"] = [AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Trainer:
        # An optional callback a config leaves out (reseed:) parses to None; LightningCLI would pass it on.
        return super()._instantiate_trainer(config, [c for c in callbacks if c is not None])


def check_same_model(resume: ResumePoint, net_config: dict[str, Any]) -> None:
    """A re-run must build the model its checkpoint was trained as; name the fields that differ."""
    ours = {k: (list(v) if isinstance(v, tuple) else v) for k, v in net_config.items() if not k.startswith("_")}
    # A field the checkpoint predates was trained at its default (e.g. prediction="epsilon").
    defaults = {
        k: p.default for k, p in inspect.signature(PatronusModel.__init__).parameters.items() if p.default is not inspect.Parameter.empty
    }
    saved = retire_options(resume.net_config, resume.path)  # a retired option at another value is named
    theirs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in {**defaults, **saved}.items()}
    diff = [
        f"model.net.{k}: checkpoint {theirs[k]!r}, this command {ours[k]!r}" for k in sorted(ours) if k in theirs and theirs[k] != ours[k]
    ]
    if diff:
        raise ValueError(
            f"{resume.path} was trained with a different model ({'; '.join(diff)}); re-run with the run's "
            "own config.yaml, or train the new model in a new --run_dir (nothing was changed)"
        )


OPTIMIZER_STATE_OPTIONS = ("model.lr", "model.weight_decay")  # AdamW param-group values a resume restores
IDENTITY_OPTIONS = ("run_dir", "debug")  # name the run (any spelling of its folder) or the output, not what it learns


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        flat.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return flat


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """ "option: old -> new" for every option `current` sets differently from a run's saved config."""
    old, new = _flatten(saved), _flatten(current)

    def show(flat: dict[str, Any], key: str, missing: str) -> str:
        return repr(flat[key]) if key in flat else missing

    return [
        f"{k}: {show(old, k, '(not in config.yaml)')} -> {show(new, k, '(not set)')}"
        for k in sorted(set(old) | set(new))
        if k.split(".")[0] not in IDENTITY_OPTIONS and (k in old, old.get(k)) != (k in new, new.get(k))
    ]


def finished_message(cli: PatronusCLI, run_dir: Path, step: int) -> str:
    """What a re-run of a finished run says: that nothing happens, what this command changed
    against the run's config.yaml (a changed option is otherwise silently ignored), and the two ways on."""
    head = f"run {run_dir} already finished at step {step} (trainer.max_steps={cli.trainer.max_steps})"
    saved_file = run_dir / CONFIG_FILE
    try:
        saved = yaml.safe_load(saved_file.read_text()) or {}
    except (OSError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict):
        return f"{head}: nothing to do; raise --trainer.max_steps above {step} to train on, or pass a new --run_dir to start fresh"
    changes = config_changes(saved, yaml.safe_load(cli.parser.dump(cli.config, skip_none=False)) or {})
    if not changes:
        return f"{head}: nothing to do; raise --trainer.max_steps above {step} to train on"
    # The optimizer's state is restored on resume, its param groups included: their values win.
    restored = [c.split(":")[0] for c in changes if c.split(":")[0] in OPTIMIZER_STATE_OPTIONS]
    keeps = (
        (
            f"; the optimizer resumes as saved, so {' and '.join(restored)} "
            f"{'keeps its old value' if len(restored) == 1 else 'keep their old values'}"
        )
        if restored
        else ""
    )
    return (
        f"{head}, so nothing was trained and nothing changed; this command differs from {saved_file} in "
        f"{'; '.join(changes)}. To train this run further, raise --trainer.max_steps above {step} (it resumes from "
        f"step {step}{keeps}); to train with the new values from scratch, pass a new --run_dir"
    )


def _train(cli: PatronusCLI) -> None:
    run_dir = Path(cli.config_init["run_dir"])
    resume = find_resume_point(run_dir)
    if resume.path or resume.skipped:
        rank_zero_info(resume.describe())
    if resume.path:
        check_same_model(resume, dict(cli.model.net.config))
    max_steps = cli.trainer.max_steps
    if resume.path and 0 < max_steps <= resume.step:
        if (run_dir / MODEL_DIR).is_dir():
            rank_zero_info(finished_message(cli, run_dir, resume.step))
            return
        if cli.trainer.is_global_zero:  # finished, but killed before its export: export the checkpoint
            rank_zero_info(f"exported model to {export_model(load_model(resume.path), run_dir / MODEL_DIR)}")
        return
    if resume.path and cli.trainer.is_global_zero:  # a killed run's rows past its checkpoint are logged again now
        for logger in cli.trainer.loggers:
            if isinstance(logger, CSVLogger):
                metrics = Path(logger.log_dir) / ExperimentWriter.NAME_METRICS_FILE
                dropped = drop_rows_after(metrics, resume.step)
                if dropped:
                    rank_zero_info(
                        f"{metrics}: removed {dropped} rows logged after step {resume.step} (the resumed run logs those steps again)"
                    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(resume.path) if resume.path else None, weights_only=True)
    if cli.trainer.is_global_zero:
        out = export_model(cli.model.net, run_dir / MODEL_DIR)
        rank_zero_info(f"exported model to {out}")
        if cli.config_init["wandb_log_model"]:
            log_model_artifact(cli.trainer, out)
    for logger in cli.trainer.loggers:  # flush the offline run now: the process may exit before wandb's atexit hook is done
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def log_model_artifact(trainer: Trainer, model_dir: Path) -> None:
    """The exported model as a wandb artifact, so a reviewer pulls the exact weights of the run."""
    import wandb

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            artifact = wandb.Artifact(f"model-{logger.experiment.id}", type="model", metadata={"step": trainer.global_step})
            artifact.add_dir(str(model_dir))
            logger.experiment.log_artifact(artifact, aliases=["latest", f"step{trainer.global_step}"])


def _check_config_files(args: Optional[list[str]]) -> None:
    """A YAML syntax error in a --config file, reported with the file named (jsonargparse does not)."""
    argv = sys.argv[1:] if args is None else args
    files = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    files += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"--config {f}: no such file")
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ValueError(f"--config {f}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None


def with_default_config(argv: list[str], default_config: Optional[Path]) -> list[str]:
    """`python train.py` alone trains the default preset: without a --config, `default_config` comes first
    (a whole preset, not defaults merged under another one, so no preset's keys leak into another's)."""
    if default_config is None or any(a == "--config" or a.startswith("--config=") for a in argv):
        return argv
    if any(a in ("-h", "--help", "--print_config") or a.startswith("--print_config=") for a in argv):
        return argv
    rank_zero_info(f"no --config given: training the default preset {default_config}")
    return ["--config", str(default_config), *argv]


def override_args(pairs: Sequence[str]) -> list[str]:
    """train.py arguments from KEY=VALUE overrides (the benchmarks' `--set`): ["model.lr=1e-3"] → ["--model.lr", "1e-3"]."""
    return [arg for kv in pairs for arg in (f"--{kv.partition('=')[0]}", kv.partition("=")[2])]


def train_main(
    args: Optional[list[str]] = None, model_class: type[PatronusModule] = PatronusModule, default_config: Optional[Path] = None
) -> PatronusCLI:
    """`python train.py --config configs/X.yaml [overrides]`; re-running the same command resumes
    from the newest checkpoint that loads, and a finished run re-run unchanged does nothing.
    `model_class`: a PatronusModule subclass with the same options (a benchmark's variant).
    `default_config`: the preset trained when no --config is given (None: --config is required)."""
    if args is None:  # the command line itself (LightningCLI warns when given both args and a command line)
        sys.argv[1:] = argv = with_default_config(sys.argv[1:], default_config)
    else:
        args = argv = with_default_config(list(args), default_config)
    debug = any(a in ("--debug", "--debug=true", "--debug=True") for a in argv)
    report_user_errors(lambda: _check_config_files(argv), debug)
    cli = PatronusCLI(args=args, model_class=model_class)
    report_user_errors(lambda: _train(cli), cli.config_init["debug"])
    return cli


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    train_main()
