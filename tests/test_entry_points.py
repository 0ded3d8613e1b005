"""The entry points a person tries first: `python train.py`, `python sample.py`, `python -m patronus --help/--version`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import patronus

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PYTHONUNBUFFERED": "1", **__import__("os").environ},
    )


def test_sample_alone_without_a_default_run_says_how_to_make_it(tmp_path):
    proc = run(str(REPO / "sample.py"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], "one line"
    assert "python train.py" in proc.stderr and "runs/mnist_cpu" in proc.stderr


def test_analyses_help_lists_every_command_and_version(tmp_path):
    from patronus.cli.analyses import COMMANDS

    help_text = run("-m", "patronus", "--help", cwd=tmp_path).stdout
    for name, (fn, _) in COMMANDS.items():
        summary = (fn.__doc__ or "").strip().splitlines()[0]
        assert name in help_text and summary.split()[0] in help_text, name
    version = run("-m", "patronus", "--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"patronus {patronus.__version__}"


@pytest.mark.slow
def test_train_alone_trains_the_default_preset_and_sample_alone_uses_it(tmp_path):
    """No --config: the default run's preset (mnist_cpu: K = 30, v output) into runs/mnist_cpu; then
    `python sample.py` with no arguments samples from it into outputs/mnist_cpu."""
    proc = run(str(REPO / "train.py"), "--trainer.max_steps", "2", "--data.root", str(REPO / "data"), "--logger", "none", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "no --config given" in proc.stdout + proc.stderr
    config = json.loads((tmp_path / "runs" / "mnist_cpu" / "model" / "config.json").read_text())
    assert config["num_prototypes"] == 30 and config["prediction"] == "v"

    proc = run(
        str(REPO / "sample.py"),
        "--steps",
        "2",
        "--edit_steps",
        "2",
        "--num_samples",
        "1",
        "--indices",
        "[0]",
        "--edit_top",
        "0",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "outputs" / "mnist_cpu" / "summary.json").read_text())
    assert len(summary["reconstruction_psnr_db"]) == 1
