"""Faults a run must survive: kills at any moment (also mid-write, temporary folder on another
filesystem), truncated checkpoints, divergence, re-runs. Nothing on disk may be lost."""

import csv
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from patronus.cli.train import train_main
from patronus.models.patronus import PatronusModel
from patronus.runs import export_model, find_resume_point, load_model
from patronus.training.logs import logged_after
from tests.conftest import REPO, TINY_NET

TINY = str(REPO / "configs" / "mnist_tiny.yaml")
QUIET = [
    "--trainer.limit_val_batches",
    "0",
    "--interpret_monitor.every_n_steps",
    "0",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--data.root",
    str(REPO / "data"),
]


@pytest.fixture
def other_tmp(tmp_path: Path):
    """A temporary folder on another filesystem than the run (/dev/shm), as on clusters with node-local /tmp."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem (/dev/shm) for the temporary folder")
    d = Path(tempfile.mkdtemp(prefix="patronus-test-", dir=shm))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def fake_ckpt(path: Path, step: int, value: float = 1.0) -> bytes:
    torch.save({"global_step": step, "state_dict": {"net.w": torch.full((256,), value)}, "net_config": {}}, path)
    return path.read_bytes()


def test_resume_picks_newest_loadable_and_moves_truncated_aside(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    fake_ckpt(ckpts / "step0000020.ckpt", 20)
    whole = fake_ckpt(ckpts / "step0000030.ckpt", 30)
    (ckpts / "step0000030.ckpt").write_bytes(whole[: len(whole) // 3])  # a kill during a cross-filesystem copy
    (ckpts / "last.ckpt").write_bytes(whole[:100])
    fake_ckpt(ckpts / "nan.ckpt", 40, float("nan"))
    (ckpts / ".tmp-last.ckpt-abc").write_bytes(b"partial")  # a killed atomic write
    point = find_resume_point(tmp_path)
    assert point.path == ckpts / "step0000020.ckpt" and point.step == 20
    text = point.describe()
    assert "resuming from" in text and "step0000020.ckpt (step 20)" in text
    assert re.search(r"skipped .*step0000030\.ckpt: not a readable checkpoint: truncated.*moved to .*corrupt", text)
    assert re.search(r"skipped .*nan\.ckpt: holds NaN/inf", text)
    assert "weights_only" not in text.replace("safe weights_only", "")
    # Nothing lost: the truncated files are kept byte for byte in checkpoints/corrupt/.
    assert (ckpts / "corrupt" / "step0000030.ckpt").read_bytes() == whole[: len(whole) // 3]
    assert (ckpts / "corrupt" / "last.ckpt").read_bytes() == whole[:100]
    assert sorted(p.name for p in ckpts.iterdir()) == ["corrupt", "nan.ckpt", "step0000020.ckpt"]


def test_kill_mid_write_keeps_the_old_file_and_leaks_no_temporary(tmp_path, other_tmp):
    target = tmp_path / "checkpoints" / "last.ckpt"
    target.parent.mkdir()
    old = fake_ckpt(target, 20)
    child = (
        "import sys, time\nfrom patronus.runs import atomic_write\n"
        "def slow(fh):\n    for _ in range(1000):\n        fh.write(b'x' * 4096); fh.flush(); time.sleep(0.01)\n"
        f"atomic_write({str(target)!r}, slow)\n"
    )
    env = {**os.environ, "TMPDIR": str(other_tmp), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", child], env=env, cwd=REPO)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.stat().st_size > 40_000 for p in target.parent.glob(".tmp-*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.read_bytes() == old
    assert list(target.parent.glob(".tmp-*")), "the kill should have caught the write in progress"
    assert find_resume_point(tmp_path).step == 20  # what a re-run does first: it also removes the temporary
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


class Tail:
    """The highest `step N` status line a training subprocess printed so far."""

    def __init__(self, proc: subprocess.Popen):
        self.step, self.lines = 0, []
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line)
            m = re.match(r"step\s+(\d+) \|", line)
            if m:
                self.step = max(self.step, int(m.group(1)))


@pytest.mark.slow
def test_killed_at_random_moments_every_rerun_resumes_within_one_interval(tmp_path, other_tmp):
    run, every, max_steps = tmp_path / "run", 5, 30
    args = [
        str(REPO / "train.py"),
        "--config",
        TINY,
        "--run_dir",
        str(run),
        "--logger",
        "csv",
        *QUIET,
        "--trainer.max_steps",
        str(max_steps),
        "--checkpoint.every_n_train_steps",
        str(every),
        "--status.every_n_steps",
        "1",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(other_tmp)}
    rng = random.Random(13)
    resumed_from = []
    for _kill in range(3):
        proc = subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail = Tail(proc)
        deadline = time.time() + 120
        while time.time() < deadline and tail.step < (resumed_from[-1] if resumed_from else 0) + every + 1:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 1.5))  # a random moment: mid-step, mid-checkpoint-write, ...
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reached = tail.step
        point = find_resume_point(run)
        assert point.path is not None and point.step >= reached - every, (reached, point.describe())
        assert not list((run / "checkpoints").glob(".tmp-*")) and not list((run / "checkpoints").glob("corrupt/*"))
        resumed_from.append(point.step)
        if reached >= max_steps:
            break
    rows_before = list(csv.DictReader((run / "metrics.csv").open())) if (run / "metrics.csv").is_file() else []
    rows_before = [r for r in rows_before if not logged_after(r, resumed_from[-1])]  # what the kill logged past it goes
    done = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = done.stdout + done.stderr
    assert f"(step {resumed_from[-1]})" in log
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == max_steps
    assert torch.isfinite(torch.cat([p.flatten() for p in load_model(run).parameters()])).all()
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [{k: r[k] for k in old} for r, old in zip(rows, rows_before)] == rows_before  # earlier rows kept
    assert_continuous(rows)
    assert not [p for p in run.rglob("*") if p.name.startswith((".tmp-", ".model-"))]


def assert_continuous(rows: list[dict[str, str]]) -> None:
    """Each training step logged once, in order: no step repeated by a resume."""
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == sorted(set(steps)), steps


def test_resume_after_a_kill_continues_the_metrics_history(tmp_path, capsys):
    run = tmp_path / "run"
    base = [
        "--config",
        TINY,
        "--run_dir",
        str(run),
        "--logger",
        "csv",
        *QUIET,
        "--checkpoint.every_n_train_steps",
        "5",
        "--trainer.log_every_n_steps",
        "2",
    ]
    assert run_train([*base, "--trainer.max_steps", "5"], capsys)[0] == 0
    at_five = tmp_path / "checkpoints_at_5"
    shutil.copytree(run / "checkpoints", at_five)
    assert run_train([*base, "--trainer.max_steps", "9"], capsys)[0] == 0  # logs steps 5, 7 and a summary at 9 ...
    shutil.rmtree(run / "checkpoints")  # ... and is "killed" before any checkpoint after step 5 lasts
    shutil.copytree(at_five, run / "checkpoints")
    shutil.rmtree(run / "model")
    logged_twice = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["step"] for r in logged_twice if r["train/loss"]] == ["1", "3", "5", "7"]

    code, log = run_train([*base, "--trainer.max_steps", "9"], capsys)
    assert code == 0 and "(step 5)" in log and "removed 3 rows logged after step 5" in log, log[-2000:]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["step"] for r in rows if r["train/loss"]] == ["1", "3", "5", "7"]
    assert [r["step"] for r in rows if r["summary/steps"]] == ["5", "9"]  # each finished segment's summary, once
    assert rows[:2] == logged_twice[:2]  # the history before the checkpoint is untouched
    assert_continuous(rows)


@pytest.fixture
def capsys(capsys, caplog):
    """stdout/stderr and Lightning's info log (rank_zero_info) together."""
    capsys.caplog = caplog
    return capsys


def run_train(args: list[str], capsys) -> tuple[int, str]:
    """train_main in-process: (exit code, log lines + stdout + stderr)."""
    capsys.caplog.clear()
    try:
        train_main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, capsys.caplog.text + out.out + out.err


def test_divergence_stops_with_step_and_cause_and_exports_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    code, log = run_train(
        [
            "--config",
            TINY,
            "--run_dir",
            str(run),
            "--logger",
            "none",
            *QUIET,
            "--model.lr",
            "1e6",
            "--model.warmup_steps",
            "0",
            "--trainer.max_steps",
            "20",
            "--checkpoint.every_n_train_steps",
            "1",
            "--trainer.precision",
            "32",
        ],
        capsys,
    )
    assert code == 2
    last = log.strip().splitlines()[-1]
    assert re.match(r"error: .*step \d+.*learning rate", last), last
    assert not (run / "model").exists()
    for ckpt in (run / "checkpoints").glob("*.ckpt"):  # what was kept is good
        assert torch.isfinite(torch.cat([v.flatten().float() for v in torch.load(ckpt, weights_only=True)["state_dict"].values()])).all()


def test_non_finite_weights_are_never_exported_nor_loaded(tmp_path):
    net = PatronusModel(**TINY_NET)
    out = export_model(net, tmp_path / "model")
    weights = out / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["encoder.prototypes"][0, 0] = float("nan")
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors: 1 of \d+ tensors hold NaN/inf"):
        load_model(out)
    bad = PatronusModel(**TINY_NET)
    with torch.no_grad():
        bad.encoder.prototypes.fill_(float("inf"))
    good_bytes = weights.read_bytes()
    with pytest.raises(ValueError, match=r"export to .*model refused: .*NaN/inf"):
        export_model(bad, out)
    assert weights.read_bytes() == good_bytes  # the previous export is untouched
    ckpt = tmp_path / "nan.ckpt"
    torch.save({"net_config": dict(TINY_NET), "state_dict": {f"net.{k}": v for k, v in bad.state_dict().items()}}, ckpt)
    with pytest.raises(ValueError, match=r"nan\.ckpt: .*NaN/inf"):
        load_model(ckpt)


def test_load_errors_never_advise_an_unsafe_load(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('ran')",))

    torch.save({"net_config": dict(TINY_NET), "state_dict": {}, "x": Evil()}, tmp_path / "evil.ckpt")
    fake_ckpt(tmp_path / "t.ckpt", 1)
    (tmp_path / "t.ckpt").write_bytes((tmp_path / "t.ckpt").read_bytes()[:200])
    for name, expected in (("evil.ckpt", "objects a safe load refuses"), ("t.ckpt", "truncated")):
        with pytest.raises(ValueError) as info:
            load_model(tmp_path / name)
        message = str(info.value)
        assert name in message and expected in message and "\n" not in message
        assert "False" not in message and "trust" not in message, message


def test_rerun_never_destroys(tmp_path, capsys):
    run = tmp_path / "run"
    base = [
        "--config",
        TINY,
        "--run_dir",
        str(run),
        "--logger",
        "csv",
        *QUIET,
        "--checkpoint.every_n_train_steps",
        "5",
        "--trainer.log_every_n_steps",
        "2",
    ]
    code, _ = run_train([*base, "--trainer.max_steps", "7"], capsys)
    assert code == 0
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7  # final step saved
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    code, log = run_train([*base, "--trainer.max_steps", "7"], capsys)  # unchanged: a no-op that says so
    assert code == 0 and "already finished at step 7" in log
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files

    code, log = run_train([*base, "--trainer.max_steps", "7", "--model.lr", "0.01", "--data.batch_size", "16"], capsys)
    last = log.strip().splitlines()[-1]  # changed options are named, old -> new, with both ways on
    assert code == 0 and "already finished at step 7" in last, last
    assert "model.lr: 0.002 -> 0.01" in last and "data.batch_size: 32 -> 16" in last, last
    assert "raise --trainer.max_steps above 7" in last and "model.lr keeps its old value" in last and "new --run_dir" in last, last
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files

    code, log = run_train([*base, "--trainer.max_steps", "9", "--model.net.num_prototypes", "4"], capsys)
    assert code == 2 and "model.net.num_prototypes: checkpoint 8, this command 4" in log.strip().splitlines()[-1]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files  # config.yaml not rewritten

    old_rows = list(csv.DictReader((run / "metrics.csv").open()))
    code, log = run_train([*base, "--trainer.max_steps", "12"], capsys)
    assert code == 0 and "resuming from" in log and "(step 7)" in log
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert len(rows) > len(old_rows) and old_rows  # appended, nothing deleted (new columns widen the header)
    assert [{k: r[k] for k in old} for r, old in zip(rows, old_rows)] == old_rows
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
