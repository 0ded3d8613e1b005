"""Two-process DDP on CPU (gloo): both ranks end with identical weights; the real command works too."""

import os
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch

from patronus.data.datamodule import PatronusDataModule
from patronus.models.patronus import PatronusModel
from patronus.training.module import PatronusModule
from tests.conftest import REPO, TINY_NET


class SaveRankWeights(pl.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        torch.save({"state": state, "val": trainer.callback_metrics["val/loss"].item()}, f"{self.folder}/rank{trainer.global_rank}.pt")


def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    pl.seed_everything(0)
    module = PatronusModule(PatronusModel(**TINY_NET), lr=2e-3, snr_gamma=5.0)
    data = PatronusDataModule(root=str(REPO / "data"), batch_size=8, train_subset=256, val_subset=32)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=6,
        check_val_every_n_epoch=None,
        callbacks=[SaveRankWeights(tmp_path)],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    init = PatronusModule(PatronusModel(**TINY_NET)).state_dict()
    assert any(not torch.equal(init[k], r0["state"][k]) for k in init if k in r0["state"])  # it trained
    assert r0["val"] == r1["val"]  # val/loss is synced across ranks


@pytest.mark.slow
def test_train_script_with_two_ddp_processes(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "--config",
        str(REPO / "configs" / "mnist_tiny.yaml"),
        "--run_dir",
        str(run),
        "--data.root",
        str(REPO / "data"),
        "--logger",
        "csv",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.max_steps",
        "6",
        "--trainer.val_check_interval",
        "6",
        "--trainer.precision",
        "32",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "distributed_backend=gloo" in out and "All distributed processes registered. Starting with 2 processes" in out
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert (run / "model" / "diffusion_pytorch_model.safetensors").is_file()
    assert len(list((run / "samples").glob("*.png"))) == 1  # pictures once, from rank 0
