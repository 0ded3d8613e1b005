"""The experiment review in wandb, read back from the offline run as a reviewer gets it after
`wandb sync`: every picture is the PNG on disk, captions say what is shown, the prototype table,
the run summary's headline numbers, the resolved config, the model artifact, and the analyses
logged in the training run's group."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.io import ImageReadMode, decode_image

from tests.conftest import REPO
from tests.test_train import TINY, run_script
from tests.wandb_records import read_run


def _png(path) -> torch.Tensor:
    return decode_image(str(path), mode=ImageReadMode.RGB)


@pytest.fixture(scope="module")
def reviewed_run(tmp_path_factory: pytest.TempPathFactory):
    """The tiny preset trained with the default (offline wandb) logger, then sample.py on it."""
    tmp = tmp_path_factory.mktemp("review")
    run, out = tmp / "run", tmp / "out"
    run_script(
        str(REPO / "train.py"),
        "--config",
        TINY,
        "--run_dir",
        str(run),
        "--data.root",
        str(REPO / "data"),
        "--wandb_log_model",
        "true",
        "--run_summary.steps",
        "10",
        cwd=tmp,
    )
    run_script(
        str(REPO / "sample.py"),
        "--checkpoint",
        str(run),
        "--out",
        str(out),
        "--indices",
        "[0,1,2]",
        "--steps",
        "5",
        "--edit_steps",
        "5",
        "--num_samples",
        "1",
        "--edit_top",
        "1",
        cwd=tmp,
    )
    (folder,) = (run / "wandb").glob("offline-run-*")
    return run, out, read_run(folder)


@pytest.mark.slow
def test_training_pictures_in_wandb_are_the_pngs_on_disk_with_captions(reviewed_run):
    run, _, logged = reviewed_run
    rows = [r for r in logged.history if "samples/reference_vs_ddim" in r]
    assert len(rows) == 2  # one grid per validation, at steps 20 and 40
    for row in rows:
        meta = row["samples/reference_vs_ddim"]
        assert "row 1 references" in meta["captions"][0]
        step = int(meta["captions"][0].split(":")[0].removeprefix("step "))
        assert step in (20, 40)
        (media,) = meta["filenames"]
        logged_png, disk = _png(logged.files / media), _png(run / "samples" / f"step_{step:07d}.png")
        assert disk.float().std() > 10, "the grid on disk is flat"
        assert torch.equal(logged_png, disk), f"wandb's {media} is not the grid on disk"
    probe = next(r for r in logged.history if "interpret/gallery" in r)
    assert "nearest real patches" in probe["interpret/gallery"]["captions"][0]
    table = next(r["interpret/prototypes"] for r in logged.history if "interpret/prototypes" in r)
    assert table["_type"] == "table-file" and table["ncols"] >= 5 and table["nrows"] == 8


@pytest.mark.slow
def test_run_summary_config_and_model_artifact(reviewed_run):
    run, _, logged = reviewed_run
    assert 10 < logged.summary["summary/reconstruction_psnr_db"] < 80
    assert logged.summary["summary/img_per_s"] > 0 and logged.summary["summary/steps"] == 40
    net = logged.config["model"]["net"]["init_args"]  # the resolved config, defaults filled in
    assert net["num_prototypes"] == 8 and net["prototype_dim"] == 128
    assert f"model-{logged.run_id}:model" in logged.artifacts


@pytest.mark.slow
def test_sample_logs_into_the_training_runs_group(reviewed_run):
    run, out, logged = reviewed_run
    (folder,) = (run / "analysis" / "wandb").glob("offline-run-*")
    linked = read_run(folder)
    assert linked.group == logged.run_id and linked.job_type == "sample"
    summary = json.loads((out / "summary.json").read_text())
    assert linked.summary["sample/reconstruction_psnr_db_mean"] == pytest.approx(summary["reconstruction_psnr_db_mean"])
    assert linked.config["audited_run_id"] == logged.run_id
    for name in ("samples", "reconstructions", "edits"):
        meta = next(r[f"sample/{name}"] for r in linked.history if f"sample/{name}" in r)
        assert meta["_type"] == "image-file" and name in meta["caption"]
        assert torch.equal(_png(linked.files / meta["path"]), _png(out / f"{name}.png")), name
