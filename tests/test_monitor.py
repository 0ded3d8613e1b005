"""The interpretability probe logged during training: files, numbers checked independently, cost."""

from __future__ import annotations

import csv
import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from safetensors.torch import load_file

from patronus.cli.train import PatronusCLI
from patronus.data.datamodule import PatronusDataModule
from patronus.interpret.stats import activation_statistics
from patronus.models.patronus import PatronusModel
from patronus.pipeline import PatronusPipeline
from patronus.training.callbacks import EMA, InterpretMonitor
from patronus.training.module import PatronusModule
from tests.conftest import REPO, TINY_NET
from tests.wandb_records import read_run

STEPS, EVERY, IMAGES, DDIM, POOL, TOP_K = 20, 10, 4, 5, 48, 3
FILES = {"heatmap.png", "histograms.png", "samples.png", "gallery.png", "stats.json", "gallery.json", "probe.safetensors"}


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory: pytest.TempPathFactory):
    """20 real training steps of the tiny model with EMA, a probe every 10 steps, CSV + offline wandb + TensorBoard."""
    run = tmp_path_factory.mktemp("monitor")
    pl.seed_everything(0, verbose=False)
    module = PatronusModule(PatronusModel(**TINY_NET), lr=2e-3, warmup_steps=5, snr_gamma=5.0)
    data = PatronusDataModule(root=str(REPO / "data"), batch_size=32, val_subset=64)
    monitor = InterpretMonitor(every_n_steps=EVERY, num_images=IMAGES, steps=DDIM, pool_size=POOL, top_k=TOP_K, bins=10)
    loggers = [
        CSVLogger(run / "csv", name="", version=""),
        WandbLogger(save_dir=run, project="test", offline=True),
        TensorBoardLogger(run / "tb", name="", version=""),
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_steps=STEPS,
        logger=loggers,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=run,
        callbacks=[EMA(decay=0.9), monitor],
    )
    trainer.fit(module, datamodule=data)
    pool = torch.cat([b["image"] for b in data.val_dataloader()])[:POOL]
    # After training the module holds the EMA weights, i.e. exactly what the last probe read.
    return run, module.net.eval(), pool, monitor


@pytest.mark.slow  # all share one short monitored training run (~45 s on a busy 2-core machine)
def test_probe_files_every_interval(monitored_run):
    run, _, _, _ = monitored_run
    steps = sorted(p.name for p in (run / "interpret").iterdir())
    assert steps == ["step_0000010", "step_0000020"]
    for s in steps:
        assert FILES <= {p.name for p in (run / "interpret" / s).iterdir()}


@pytest.mark.slow  # all share one short monitored training run (~45 s on a busy 2-core machine)
@torch.no_grad()
def test_heatmap_last_column_is_decoded_minus_reference(monitored_run):
    run, net, pool, _ = monitored_run
    probe = load_file(str(run / "interpret" / "step_0000020" / "probe.safetensors"))
    K = net.config.num_prototypes
    assert probe["heatmap"].shape == (K, DDIM) and probe["timesteps"].shape == (DDIM,)
    assert torch.equal(probe["x0"], pool[:IMAGES])  # the fixed probe batch: the first validation images
    assert torch.equal(probe["x_T"], torch.randn(probe["x0"].shape, generator=torch.Generator().manual_seed(0)))
    # Independently: decode the same noise under s(x0) with the final (EMA) weights, then re-encode.
    s0 = net.encode(probe["x0"])
    decoded = PatronusPipeline(model=net).denoise(probe["x_T"], s0, DDIM, clip=False)
    expected = (net.encode(decoded.clamp(-1, 1)) - s0).mean(0)  # (K,)
    torch.testing.assert_close(probe["heatmap"][:, -1], expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(probe["decoded"], decoded, rtol=1e-4, atol=1e-5)
    assert probe["timesteps"][0] > probe["timesteps"][-1]  # decoding order: high t first


@pytest.mark.slow  # all share one short monitored training run (~45 s on a busy 2-core machine)
@torch.no_grad()
def test_stats_table_matches_activation_statistics(monitored_run):
    run, net, pool, _ = monitored_run
    stored = json.loads((run / "interpret" / "step_0000020" / "stats.json").read_text())
    expected = activation_statistics(net.encode(pool))
    assert stored["n"] == POOL == expected["n"]
    for key in ("mean", "std", "q01", "q99"):
        assert stored[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-7)
    for q, row in expected["quantiles"].items():
        assert stored["quantiles"][q] == pytest.approx(row, rel=1e-4, abs=1e-7)
    # One wandb.Table per probe; with image cells wandb stages it as a `run_table` artifact (table
    # JSON + tile PNGs) that `wandb sync` uploads: read the last probe's back from its manifest.
    (folder,) = run.glob("wandb/offline-run-*")
    logged = read_run(folder)
    tables = [files for name, files in zip(logged.artifacts, logged.artifact_files) if name.endswith(":run_table")]
    assert len(tables) == 2
    files = tables[-1]
    table = json.loads(files["interpret/prototypes.table.json"].read_text())
    assert table["columns"][:3] == ["prototype", "mean", "std"] and len(table["data"]) == net.config.num_prototypes
    assert table["columns"][-2:] == ["emerges_at_t", "gallery"]
    col = table["columns"].index("mean")
    for j, row in enumerate(table["data"]):
        assert row[0] == j and row[col] == pytest.approx(expected["mean"][j], rel=1e-4, abs=1e-7)
        tile = row[-1]  # an image cell: the prototype's gallery row, a real picture next to the table
        assert tile["_type"] == "image-file" and f"p{j}" in tile["caption"]
        pixels = _png(files[tile["path"]])
        assert pixels.float().std() > 10, f"p{j}'s gallery tile is flat"


@pytest.mark.slow  # all share one short monitored training run (~45 s on a busy 2-core machine)
@torch.no_grad()
def test_gallery_boxes_come_from_the_receptive_field(monitored_run):
    run, net, pool, _ = monitored_run
    gallery = json.loads((run / "interpret" / "step_0000020" / "gallery.json").read_text())
    rf = net.encoder.receptive_field()
    assert gallery["receptive_field"] == {"size": rf.size, "jump": rf.jump, "start": rf.start, "image_size": rf.image_size}
    d = net.encoder.distance_maps(pool)  # (N, K, H', W')
    dmin = d.flatten(2).min(dim=2).values  # (N, K)
    assert len(gallery["hits"]) == net.config.num_prototypes
    for j, row in enumerate(gallery["hits"]):
        assert [h["image_index"] for h in row] == dmin[:, j].argsort()[:TOP_K].tolist()
        for h in row:
            h_, w_ = h["cell"]
            assert d[h["image_index"], j, h_, w_] == pytest.approx(dmin[h["image_index"], j].item(), rel=1e-5, abs=1e-7)
            assert tuple(h["box"]) == rf.box(h_, w_)
            top, left, bottom, right = h["box"]
            assert 0 < bottom - top <= rf.size and 0 < right - left <= rf.size


@pytest.mark.slow  # all share one short monitored training run (~45 s on a busy 2-core machine)
def test_cost_fraction_is_logged(monitored_run):
    run, _, _, monitor = monitored_run
    with open(run / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("interpret/cost_fraction")]
    assert [int(r["step"]) for r in rows][:2] == [EVERY, 2 * EVERY]  # each probe, then once more at the end
    assert all(0 < float(r["interpret/cost_fraction"]) < 1 for r in rows)
    assert monitor.probes == 2 and 0 < monitor.seconds and 0 < monitor.cost_fraction() < 1


def test_cli_adds_the_monitor_after_ema(tmp_path):
    cli = PatronusCLI(args=["--config", str(REPO / "configs" / "mnist_cpu.yaml"), "--logger", "none", "--run_dir", str(tmp_path)])
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert EMA in kinds and InterpretMonitor in kinds and kinds.index(EMA) < kinds.index(InterpretMonitor)
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, InterpretMonitor))
    assert cli.trainer.max_steps % monitor.every == 0  # the default run ends on a probe


def _png(path) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(str(path), mode=ImageReadMode.RGB)


@pytest.mark.slow  # all share one short monitored training run (~45 s on a busy 2-core machine)
def test_wandb_and_tensorboard_pictures_are_the_pngs_on_disk(monitored_run):
    """What a reviewer sees in wandb / TensorBoard is the picture on disk, pixel for pixel (a float
    image read by a newer wandb as uint8 without rescaling was all black, max 1 of 255)."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    run, _, _, _ = monitored_run
    media = next(run.glob("wandb/offline-run-*/files/media/images/interpret"))
    events = EventAccumulator(str(run / "tb"), size_guidance={IMAGES: 0}).Reload()
    for name in ("samples", "heatmap", "histograms", "gallery"):
        logged = sorted(media.glob(f"{name}_*.png"), key=lambda p: int(p.stem.split("_")[1]))
        assert len(logged) == 2, f"{name}: one wandb picture per probe, got {[p.name for p in logged]}"
        tb = events.Images(f"interpret/{name}")
        assert [e.step for e in tb] == [10, 20]
        for step, wb, tb_event in zip((10, 20), logged, tb):
            disk = _png(run / "interpret" / f"step_{step:07d}" / f"{name}.png")
            assert disk.float().std() > 10, f"{name} at step {step} on disk is flat"
            assert torch.equal(_png(wb), disk), f"wandb's {wb.name} differs from the PNG on disk"
            tb_img = torch.ops.image.decode_png(torch.frombuffer(bytearray(tb_event.encoded_image_string), dtype=torch.uint8), 0, False)[:3]
            assert torch.equal(tb_img, disk), f"TensorBoard's interpret/{name} at step {step} differs from the PNG on disk"
