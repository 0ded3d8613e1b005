"""Shared fixtures: offline wandb in tmp dirs, the shared datasets (skip locally, fail in CI), a tiny trained model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import pytest
import torch

from patronus.data.datamodule import PatronusDataModule
from patronus.models.patronus import PatronusModel
from patronus.pipeline import PatronusPipeline
from patronus.training.callbacks import EMA
from patronus.training.module import PatronusModule

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"

# Toy widths (DESIGN practice 7): 32 px, channels (16, 32), K = 8, the paper's ε output.
TINY_NET = dict(
    image_size=32,
    in_channels=1,
    num_prototypes=8,
    block_out_channels=(16, 32),
    layers_per_block=1,
    attention_levels=(False, False),
    mid_attention=False,
)


@pytest.fixture(autouse=True, scope="session")
def _offline_wandb(tmp_path_factory: pytest.TempPathFactory):
    """wandb writes under ~/.local/share and ~/.cache unless told otherwise: keep it in tmp, offline."""
    d = tmp_path_factory.mktemp("wandb")
    env = {"WANDB_DIR": d, "WANDB_DATA_DIR": d / "data", "WANDB_CACHE_DIR": d / "cache", "WANDB_CONFIG_DIR": d / "config"}
    old = {k: os.environ.get(k) for k in [*env, "WANDB_MODE", "WANDB_SILENT"]}
    os.environ.update({k: str(v) for k, v in env.items()}, WANDB_MODE="offline", WANDB_SILENT="true")
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """../shared/datasets: optional on a user's fresh clone, required in CI."""
    if not SHARED.is_dir():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but the shared datasets folder {SHARED} is missing")
        pytest.skip(f"shared datasets not found at {SHARED} (only present in the development checkout)")
    return SHARED


def train_tiny(
    run_dir: Path,
    max_steps: int = 400,
    shortcut: Optional[dict] = None,
    extra_callbacks: Sequence[pl.Callback] = (),
    module_options: Optional[dict] = None,
    **trainer_kwargs,
) -> PatronusModule:
    """Train the tiny model on the embedded MNIST subset (real data, optionally with a planted
    shortcut), EMA weights at the end; `module_options` go to PatronusModule."""
    pl.seed_everything(0, verbose=False)
    module = PatronusModule(PatronusModel(**TINY_NET), lr=2e-3, warmup_steps=50, snr_gamma=5.0, **(module_options or {}))
    data = PatronusDataModule(root=str(REPO / "data"), batch_size=32, val_subset=64, shortcut=shortcut)
    trainer = pl.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=run_dir,
        callbacks=[EMA(decay=0.99), *extra_callbacks],
        **{"limit_val_batches": 0, **trainer_kwargs},
    )
    trainer.fit(module, datamodule=data)
    return module


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> PatronusModel:
    """~30 s of CPU training: enough for faithful inversion and measurable edits, not for pretty samples."""
    net = train_tiny(tmp_path_factory.mktemp("tiny")).net.eval()
    torch.set_grad_enabled(True)
    return net


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model: PatronusModel) -> PatronusPipeline:
    """The tiny model behind the one inference object (eval mode, no grad, fp32 inside its verbs)."""
    return PatronusPipeline(model=tiny_model)


@pytest.fixture(scope="session")
def mnist_test_images() -> torch.Tensor:
    from patronus.data.registry import build_dataset

    ds = build_dataset("mnist", str(REPO / "data"), "test", 32)
    return torch.stack([ds[i]["image"] for i in range(16)])
