"""Training through Lightning: fast_dev_run, the real scripts end to end, resume after a kill."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from patronus.cli.train import PatronusCLI
from patronus.runs import load_model
from tests.conftest import REPO, train_tiny

TINY = str(REPO / "configs" / "mnist_tiny.yaml")


def test_fast_dev_run_updates_weights(tmp_path):
    cli = PatronusCLI(args=["--config", TINY, "--logger", "none", "--run_dir", str(tmp_path), "--trainer.fast_dev_run", "2"])
    before = {k: v.clone() for k, v in cli.model.net.state_dict().items()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = cli.model.net.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("denoiser.") for k in changed)
    assert torch.isfinite(torch.stack([v.float().abs().sum() for v in after.values()])).all()


def run_script(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_train_then_sample_scripts_end_to_end(tmp_path):
    run = tmp_path / "run"
    run_script(str(REPO / "train.py"), "--config", TINY, "--run_dir", str(run), "--data.root", str(REPO / "data"), cwd=tmp_path)
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step_0000020.png", "step_0000040.png"]
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), "wandb should log offline into the run dir"
    net = load_model(run)
    assert net.config.num_prototypes == 8

    out = tmp_path / "out"
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
        "2",
        "--edit",
        '["3=q99", "1=q01,2*2"]',
        cwd=tmp_path,
    )
    summary = json.loads((out / "summary.json").read_text())
    # User errors end with one line naming what was wrong, exit code 2, no traceback.
    for args, message in [
        (["--unconditional", "4"], "no trained activation prior"),  # needs `python -m patronus prior` first
        (["--edit", "9=q99"], "prototype 9 does not exist"),
        (["--steps", "0"], "steps=0"),
        (["--edit", "3=max"], "'max' is now called 'q99'"),
    ]:
        proc = subprocess.run(
            [
                sys.executable,
                str(REPO / "sample.py"),
                "--checkpoint",
                str(run),
                "--out",
                str(out / "u"),
                "--steps",
                "3",
                "--edit_steps",
                "3",
                "--num_samples",
                "1",
                "--edit_top",
                "0",
                *args,
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error:") and message in proc.stderr, proc.stderr
    assert {"samples.png", "reconstructions.png", "edits.png", "summary.json"} <= {p.name for p in out.iterdir()}
    assert summary["references"] == ["mnist:test:0", "mnist:test:1", "mnist:test:2"]
    assert [e["edit"] for e in summary["edits"]] == ["3=q99", "1=q01,2*2.0"]
    assert len(summary["reconstruction_psnr_db"]) == 3
    assert summary["edits"][0]["prototypes"]["3"]["requested_mean"] == pytest.approx(summary["activation_range"]["q99"][3])


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = [
        str(REPO / "train.py"),
        "--config",
        TINY,
        "--run_dir",
        str(run),
        "--data.root",
        str(REPO / "data"),
        "--logger",
        "csv",
        "--trainer.max_steps",
        "200",
        "--checkpoint.every_n_train_steps",
        "10",
        "--trainer.limit_val_batches",
        "0",
    ]
    proc = subprocess.Popen([sys.executable, *args], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and not (last.is_file() and torch.load(last, weights_only=True)["global_step"] >= 20):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, weights_only=True)["global_step"]  # still loads after the kill: writes are atomic
    assert 20 <= killed_at < 200

    again = run_script(*args, cwd=tmp_path)  # the very same command
    log = again.stdout + again.stderr
    resumed = re.search(r"resuming from (\S+) \(step (\d+)\)", log)
    assert resumed and int(resumed.group(2)) >= killed_at  # the newest checkpoint that loads (last.ckpt or a newer step file)
    assert torch.load(last, weights_only=True)["global_step"] == 200
    steps = [int(line.split()[1]) for line in log.splitlines() if line.startswith("step ")]
    assert steps and min(steps) > killed_at  # continued, did not start over


def test_the_reconstruction_loss_trains_its_decoder_and_stays_out_of_the_model(tmp_path, mnist_test_images):
    """model.reconstruction_weight: the decoder learns to redraw real digits from the encoder's features
    (the term reaches the loss and the optimiser); it is a training aid, so the model keeps its keys."""
    from patronus.diffusion import reconstruction_loss
    from patronus.runs import export_model
    from tests.conftest import train_tiny

    module = train_tiny(tmp_path, max_steps=150, module_options={"reconstruction_weight": 1.0})
    x = mnist_test_images[:64]
    with torch.no_grad():
        z = module.net.encoder.features(x)
        trained = reconstruction_loss(module.feature_decoder, z, x)
        untrained = reconstruction_loss(module.net.encoder.feature_decoder(), z, x)
    assert trained < 0.3 * untrained, (float(trained), float(untrained))
    assert any(k.startswith("feature_decoder.") for k in module.state_dict())  # resumes with the run
    reloaded = load_model(export_model(module.net, tmp_path / "model"))
    assert set(reloaded.state_dict()) == set(module.net.state_dict())


def test_validation_leaves_the_training_noise_alone(tmp_path):
    """How often a run is validated (sample grids, the monitor's schedule) must not change what it
    learns: a validation loader that drew its worker seed from the global RNG shifted every later
    training noise, so moving validation from every 300 to every 350 steps changed the weights."""
    quiet = train_tiny(tmp_path / "quiet", max_steps=12).net.state_dict()
    looked_at = train_tiny(
        tmp_path / "looked_at", max_steps=12, limit_val_batches=2, val_check_interval=4, check_val_every_n_epoch=None
    ).net.state_dict()
    assert quiet.keys() == looked_at.keys()
    changed = [k for k in quiet if not torch.equal(quiet[k], looked_at[k])]
    assert not changed, f"validation changed {len(changed)} tensors, e.g. {changed[:3]}"
