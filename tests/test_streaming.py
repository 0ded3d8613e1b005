"""Prepared (litdata) data: what `python -m patronus prepare` writes equals the raw dataset, the
streaming loader covers an epoch exactly once and resumes mid-epoch where it stopped, and
`train.py` runs on it as two nodes x one device (gloo on CPU): identical weights, disjoint shards
that cover the data, rank 0 alone writing, resuming across world sizes, divergence stopping both."""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from patronus.cli.analyses import main
from patronus.data.datamodule import PatronusDataModule
from patronus.data.registry import build_dataset
from patronus.data.streaming import META_FILE, streaming
from patronus.models.patronus import PatronusModel
from patronus.runs import export_model, find_resume_point
from patronus.training.module import PatronusModule
from tests.conftest import REPO, TINY_NET
from tests.streaming_helpers import RecordSamples, read_ids

TRAIN_ROWS, BATCH = 96, 8  # one epoch = 12 steps on one process, 6 on two
MARKER = {
    "kind": "planted_marker",
    "target": "7",
    "p": 0.9,
    "q": 0.1,
    "shape": "square",
    "size": 8,
    "position": [0, 24],
    "intensity": 1.0,
    "seed": 0,
}
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "WORLD_SIZE", "LOCAL_RANK", "RANK", "GLOBAL_RANK")


def prepare_cli(out: Path, *extra: str) -> dict:
    return main(
        [
            "prepare",
            "--train_config",
            str(REPO / "configs" / "mnist_tiny.yaml"),
            "--data.root",
            str(REPO / "data"),
            "--out",
            str(out),
            "--chunk_bytes",
            "8KB",
            "--num_workers",
            "2",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded MNIST subset's first 96 rows of each split, prepared by the real command (~13 chunks a split)."""
    out = tmp_path_factory.mktemp("prepared") / "mnist32"
    summary = prepare_cli(out, "--limit", str(TRAIN_ROWS))
    assert summary["splits"] == {"train": TRAIN_ROWS, "test": TRAIN_ROWS}  # --limit cuts every split
    return out


# What prepare writes ------------------------------------------------------------------------------


def test_prepared_rows_equal_the_raw_dataset(prepared):
    meta = json.loads((prepared / META_FILE).read_text())
    assert meta["image_size"] == 32 and meta["channels"] == 1 and meta["source"]["dataset"] == "mnist"
    assert sorted(p.name for p in prepared.iterdir()) == [
        "patronus.json",
        "test",
        "test.tables.safetensors",
        "train",
        "train.tables.safetensors",
    ]
    assert len(list((prepared / "train").glob("chunk-*.bin"))) > 4  # several chunks: sharding and shuffling have units
    raw = build_dataset("mnist", str(REPO / "data"), "train", 32)
    ds = streaming(str(prepared), "train", 32, channels=1)
    assert len(ds) == TRAIN_ROWS and ds.attribute_names == raw.attribute_names and ds.classes == raw.classes
    assert torch.equal(ds.labels, raw.labels[:TRAIN_ROWS]) and torch.equal(ds.attributes, raw.attributes[:TRAIN_ROWS])
    for i in (0, 1, 47, TRAIN_ROWS - 1):
        a, b = ds[i], raw[i]
        assert set(a) == set(b) | {"index"} and int(a["index"]) == i
        assert a["image"].dtype == b["image"].dtype and a["image"].shape == b["image"].shape
        assert (a["image"] - b["image"]).abs().max() <= 1 / 255 + 1e-6  # uint8 rounding, nothing else
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["attributes"], b["attributes"])
    with pytest.raises(IndexError, match="row 96 of the prepared 'train' split"):
        ds[TRAIN_ROWS]


def test_a_baked_in_shortcut_keeps_its_masks_and_attribute(prepared, tmp_path):
    out = tmp_path / "marker"
    prepare_cli(out, "--data.shortcut", json.dumps(MARKER), "--limit", "40", "--splits", "[test]", "--balanced_splits", "[test]")
    raw = PatronusDataModule(root=str(REPO / "data"), shortcut=MARKER).build_split("test", 40)
    ds = streaming(str(out), "test", 32)
    assert ds.attribute_names[-1] == "marker" and torch.equal(ds.attributes, raw.attributes)
    for i in range(40):
        a, b = ds[i], raw[i]
        assert torch.equal(a["marker_mask"], b["marker_mask"]) and a["marker_mask"].dtype == torch.float32
        assert (a["image"] - b["image"]).abs().max() <= 1 / 255 + 1e-6
    balanced = streaming(str(out), "test_balanced", 32)  # the marker re-planted independently of the target
    assert 0.3 < balanced.attributes[:, -1].mean() < 0.7
    with pytest.raises(ValueError, match=r"made with this shortcut.*drop it with --data.shortcut null"):
        PatronusDataModule(dataset="streaming", root=str(out), shortcut=MARKER, train_split="test", val_split="test").setup("fit")
    with pytest.raises(ValueError, match=r"prepared with no shortcut.*prepare again with --data.shortcut"):
        PatronusDataModule(dataset="streaming", root=str(prepared), shortcut=MARKER).setup("fit")


def test_real_faces_with_attributes_and_a_holdout(shared_datasets, tmp_path):
    root, options = (
        shared_datasets / "celeba_subset",
        {"image_dir": "img_align_celeba_89x109", "attr_file": "list_attr_celeba_000001-010000.txt", "partition_file": None},
    )
    out = tmp_path / "celeba"
    main(
        [
            "prepare",
            "--data.dataset",
            "celeba",
            "--data.root",
            str(root),
            "--data.image_size",
            "32",
            "--data.options",
            json.dumps(options),
            "--splits",
            "[train]",
            "--limit",
            "64",
            "--out",
            str(out),
            "--num_workers",
            "2",
        ]
    )
    raw = build_dataset("celeba", str(root), "train", 32, **options)
    ds = streaming(str(out), "train", 32, channels=3)
    assert len(ds.attribute_names) == 40 and torch.equal(ds.attributes, raw.attributes[:64])
    for i in (0, 63):
        assert (ds[i]["image"] - raw[i]["image"]).abs().max() <= 1 / 255 + 1e-6
    # the preset's dataset options come along with --data.dataset streaming: the same ones are accepted
    dm = PatronusDataModule(dataset="streaming", root=str(out), image_size=32, channels=3, holdout=0.25, batch_size=8, options=options)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"data.options \{'crop': 'squash'\} differ from the options the data was prepared with"):
        streaming(str(out), "train", 32, crop="squash", **options)
    seen = torch.cat([b["index"] for b in dm.train_dataloader()])
    assert sorted(seen.tolist()) == dm.train_set.indices.tolist()  # the holdout's training rows, each once
    assert not set(seen.tolist()) & set(dm.val_set.indices.tolist())


def test_bad_input_names_the_file_and_the_fix(prepared, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        prepare_cli(prepared)
    assert info.value.code == 2 and f"--out {prepared}: the folder is not empty; pass --overwrite" in capsys.readouterr().err
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        prepare_cli(other, "--overwrite", "true")
    assert "holds files `prepare` does not write" in capsys.readouterr().err and (other / "keep.txt").is_file()
    half = tmp_path / "killed"  # a preparation killed while writing its first split: --overwrite replaces it
    (half / "train").mkdir(parents=True)
    (half / "train" / "chunk-0-0.bin").write_bytes(b"\x00")
    with pytest.raises(FileNotFoundError, match="interrupted has none: run it again with --overwrite"):
        streaming(str(half), "train", 32)
    assert prepare_cli(half, "--overwrite", "true", "--limit", "8")["splits"] == {"train": 8, "test": 8}
    with pytest.raises(ValueError, match=rf"{META_FILE}: prepared at 32 px, but the model reads 64 px.*--data.image_size 64"):
        streaming(str(prepared), "train", 64)
    with pytest.raises(ValueError, match=r"prepared with 1 channels, but the model reads 3"):
        streaming(str(prepared), "train", 32, channels=3)
    with pytest.raises(ValueError, match=r"no split 'valid'; the prepared splits are \['test', 'train'\]"):
        streaming(str(prepared), "valid", 32)
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/{META_FILE}: missing.*interrupted"):
        streaming(str(tmp_path), "train", 32)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / META_FILE).write_text((prepared / META_FILE).read_text())
    (broken / "train.tables.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match=r"train\.tables\.safetensors: not a readable safetensors file"):
        streaming(str(broken), "train", 32)
    (broken / META_FILE).write_text("{}")
    with pytest.raises(ValueError, match=rf"{META_FILE}: format None; expected 'patronus-prepared/1'"):
        streaming(str(broken), "train", 32)
    with pytest.raises(SystemExit):
        main(["prepare", "--data.dataset", "streaming", "--data.root", str(prepared), "--out", str(tmp_path / "again")])
    assert "already prepared data" in capsys.readouterr().err


def test_a_row_that_fails_stops_prepare_with_its_cause(tmp_path):
    from patronus.data.datasets import TensorImageDataset
    from patronus.data.streaming import write_split

    class Unreadable(TensorImageDataset):
        def __getitem__(self, i):
            if i == 30:
                raise ValueError("photo_30.jpg: truncated JPEG")
            return super().__getitem__(i)

    ds = Unreadable(torch.zeros(60, 1, 8, 8), torch.zeros(60, dtype=torch.long), ["a"], torch.zeros(60, 1))
    start = time.time()
    with pytest.raises(ValueError, match=r"'train' split: preparing failed: ValueError: photo_30.jpg: truncated JPEG"):
        write_split(ds, str(tmp_path / "out"), "train", chunk_bytes="1KB", num_workers=2)
    assert time.time() - start < 60  # litdata's workers are stopped, not waited for


# The streaming loader ------------------------------------------------------------------------------


def test_an_epoch_reads_every_row_once_and_batches_match_the_raw_loader(prepared):
    dm = PatronusDataModule(dataset="streaming", root=str(prepared), batch_size=BATCH, num_workers=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == TRAIN_ROWS // BATCH
    batches = list(loader)
    seen = torch.cat([b["index"] for b in batches]).tolist()
    assert sorted(seen) == list(range(TRAIN_ROWS)) and seen != sorted(seen)  # shuffled, each row once
    raw = next(iter(_raw_loader()))
    b = batches[0]
    assert set(b) == set(raw) | {"index"}
    for k in raw:
        assert b[k].dtype == raw[k].dtype and b[k].shape == raw[k].shape, k
    subset = PatronusDataModule(dataset="streaming", root=str(prepared), batch_size=BATCH, train_subset=40)
    subset.setup("fit")
    assert sorted(torch.cat([b["index"] for b in subset.train_dataloader()]).tolist()) == list(range(40))


def _raw_loader():
    dm = PatronusDataModule(root=str(REPO / "data"), batch_size=BATCH, train_subset=TRAIN_ROWS)
    dm.setup("fit")
    return dm.train_dataloader()


class StopAt(pl.Callback):
    """Stands in for a kill: the process stops after `step` steps, past its last checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("killed")


def test_resume_mid_epoch_continues_with_the_next_unseen_sample(prepared, tmp_path):
    def fit(callbacks: list, ckpt: Optional[Path] = None) -> None:
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=TRAIN_ROWS // BATCH,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            default_root_dir=tmp_path,
            callbacks=[RecordSamples(str(tmp_path)), *callbacks],
        )
        data = PatronusDataModule(dataset="streaming", root=str(prepared), batch_size=BATCH, num_workers=1)
        trainer.fit(PatronusModule(PatronusModel(**TINY_NET), lr=1e-3), datamodule=data, ckpt_path=ckpt, weights_only=True)

    with pytest.raises(RuntimeError, match="killed"):
        fit([ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1, filename="s{step}"), StopAt(7)])
    ckpt = tmp_path / "sstep=5.ckpt"
    state = torch.load(ckpt, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert state["num_samples_yielded"] == 5 * BATCH  # the loader's place is in the checkpoint, as plain types
    fit([], ckpt)
    rows = read_ids(tmp_path)
    killed, resumed = rows[:7], rows[7:]
    assert [r["step"] for r in killed] == list(range(7)) and [r["step"] for r in resumed] == list(range(5, 12))
    kept = [i for r in killed if r["step"] < 5 for i in r["ids"]]  # steps 5, 6 were lost with the kill: trained again
    assert sorted(kept + [i for r in resumed for i in r["ids"]]) == list(range(TRAIN_ROWS))
    assert [r["ids"] for r in resumed[:2]] == [r["ids"] for r in killed[5:7]]  # the same batches, in the same order


def test_an_analysis_reads_prepared_data(prepared, tmp_path):
    model = export_model(PatronusModel(**TINY_NET), tmp_path / "model")
    out = main(
        [
            "quality",
            "--checkpoint",
            str(model),
            "--data.dataset",
            "streaming",
            "--data.root",
            str(prepared),
            "--data.split",
            "test",
            "--num_images",
            "64",
            "--folds",
            "2",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "q"),
        ]
    )
    assert out["images"] == 64 and out["attributes"] == [str(d) for d in range(10)]


@pytest.mark.slow
def test_the_shortcut_report_runs_on_prepared_marker_data(tmp_path):
    """The report reads prepared data as it is: the marker attribute is its candidate confounder and the
    stored masks score where it looks (a random model: the numbers mean nothing, the plumbing does)."""
    prep = tmp_path / "marker"
    main(
        [
            "prepare",
            "--train_config",
            str(REPO / "configs" / "mnist_marker_cpu.yaml"),
            "--data.root",
            str(REPO / "data"),
            "--splits",
            "[test]",
            "--limit",
            "300",
            "--out",
            str(prep),
            "--num_workers",
            "2",
        ]
    )
    model = export_model(PatronusModel(**TINY_NET), tmp_path / "model")
    out = main(
        [
            "shortcuts",
            "--checkpoint",
            str(model),
            "--data.dataset",
            "streaming",
            "--data.root",
            str(prep),
            "--data.split",
            "test",
            "--num_images",
            "200",
            "--top",
            "2",
            "--num_refs",
            "4",
            "--steps",
            "4",
            "--info_timesteps",
            "2",
            "--info_noise",
            "1",
            "--permutations",
            "20",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "report"),
        ]
    )
    assert out["candidate_confounders"] == ["marker"] and out["ranking"][0]["hits_on_confounder_images"] is not None
    assert (tmp_path / "report" / "report.md").is_file() and (tmp_path / "report" / "where_boxes.png").is_file()


# train.py on two processes as two nodes ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(prepared: Path, run_dir: str, ids: Path, max_steps: int, *extra: str) -> list[str]:
    return [
        str(REPO / "train.py"),
        "--config",
        str(REPO / "configs" / "mnist_tiny.yaml"),
        "--run_dir",
        run_dir,
        "--data.dataset",
        "streaming",
        "--data.root",
        str(prepared),
        "--data.batch_size",
        str(BATCH),
        "--logger",
        "csv",
        "--trainer.precision",
        "32",
        "--trainer.max_steps",
        str(max_steps),
        "--trainer.strategy",
        "ddp",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--interpret_monitor.every_n_steps",
        "0",
        "--run_summary.num_images",
        "0",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.callbacks+=tests.streaming_helpers.RecordSamples",
        "--trainer.callbacks.folder",
        str(ids),
        *extra,
    ]


def launch(args: list[str], nodes: int, cwds: Optional[list[Path]] = None, timeout: int = 300) -> list[tuple[int, str]]:
    """`train.py args` as `nodes` nodes x 1 device (Lightning's environment variables, gloo on CPU), or as one
    plain process; (exit code, output) per rank."""
    base = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    base.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    port = str(free_port())
    procs = []
    for rank in range(nodes):
        env = dict(base)
        if nodes > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(rank), WORLD_SIZE=str(nodes), LOCAL_RANK="0")
            args_r = [*args, "--trainer.num_nodes", str(nodes), "--trainer.devices", "1"]
        else:
            args_r = args
        cwd = cwds[rank] if cwds else REPO
        procs.append(
            subprocess.Popen([sys.executable, *args_r], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    results, deadline = [], time.time() + timeout
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1, deadline - time.time()))
            results.append((p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
    return results


def assert_ok(results: list[tuple[int, str]]) -> str:
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank}:\n{out[-3000:]}"
    return results[0][1]


def assert_one_epoch(rows: list[dict]) -> None:
    seen = collections.Counter(i for r in rows for i in r["ids"])
    assert sorted(seen) == list(range(TRAIN_ROWS)) and set(seen.values()) == {1}, seen


@pytest.mark.slow
def test_two_nodes_train_identical_weights_on_disjoint_shards_and_rank0_alone_writes(prepared, tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]  # a relative --run_dir: each node's own folder shows what it wrote
    for n in nodes:
        n.mkdir()
    ids = tmp_path / "ids"
    ids.mkdir()
    steps = TRAIN_ROWS // (2 * BATCH)  # one epoch
    args = train_args(
        prepared,
        "run",
        ids,
        steps,
        "--trainer.limit_val_batches",
        "1",
        "--trainer.val_check_interval",
        str(steps),
        "--sample_grid.num_images",
        "2",
        "--sample_grid.steps",
        "2",
        "--trainer.callbacks+=tests.streaming_helpers.SaveWeights",
        "--trainer.callbacks.folder",
        str(ids),
    )
    out = assert_ok(launch(args, nodes=2, cwds=nodes))
    assert "distributed_backend=gloo" in out and "All distributed processes registered. Starting with 2 processes" in out
    w0, w1 = (torch.load(ids / f"weights-rank{r}.pt", weights_only=True) for r in (0, 1))
    p0, p1 = w0["parameters"], w1["parameters"]
    assert p0.keys() == p1.keys() and all(torch.equal(p0[k], p1[k]) for k in p0)  # bit-identical
    init = PatronusModule(PatronusModel(**TINY_NET)).state_dict()
    assert any(not torch.equal(init[k], p0[k]) for k in p0 if k in init)  # and trained
    # BatchNorm's running statistics are each rank's own (DDP without SyncBatchNorm; rank 0's are saved/exported)
    b0, b1 = w0["buffers"], w1["buffers"]
    assert b0.keys() == b1.keys() and all(torch.allclose(b0[k].float(), b1[k].float(), atol=1e-3) for k in b0)
    rows = read_ids(ids)
    shards = [{i for r in rows if r["rank"] == rank for i in r["ids"]} for rank in (0, 1)]
    assert not shards[0] & shards[1] and len(shards[0]) == len(shards[1]) == TRAIN_ROWS // 2
    assert_one_epoch(rows)
    run0 = nodes[0] / "run"
    assert len(list((run0 / "samples").glob("*.png"))) == 1 and (run0 / "model" / "diffusion_pytorch_model.safetensors").is_file()
    assert torch.load(run0 / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps
    assert (run0 / "config.yaml").is_file() and (run0 / "metrics.csv").is_file()
    assert not [p for p in nodes[1].rglob("*") if p.is_file()]  # rank 1 wrote nothing: no pictures, checkpoints, export, logs
    # an analysis of the run reads the prepared data from the run's own config
    result = main(["quality", "--checkpoint", str(run0), "--num_images", "32", "--folds", "2", "--device", "cpu"])
    assert result["images"] == 32


@pytest.mark.slow
def test_train_script_killed_mid_epoch_resumes_where_it_stopped(prepared, tmp_path):
    run, ids = str(tmp_path / "run"), tmp_path / "ids"
    ids.mkdir()
    epoch = TRAIN_ROWS // BATCH
    args = train_args(prepared, run, ids, epoch, "--checkpoint.every_n_train_steps", "4", "--data.num_workers", "2")
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV} | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(read_ids(ids)) < 7:  # 7 batches trained: past the checkpoint at step 4
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = read_ids(ids)
    saved = find_resume_point(Path(run)).step
    assert saved in (4, 8) and len(killed) >= 7, (saved, len(killed))
    out = assert_ok(launch(args, nodes=1))
    assert f"(step {saved})" in out
    rows = read_ids(ids)[len(killed) :]
    assert [r["step"] for r in rows] == list(range(saved, epoch))
    assert_one_epoch([r for r in killed if r["step"] < saved] + rows)  # nothing the checkpoint holds is seen twice


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_a_run_resumes_on_another_number_of_processes(prepared, tmp_path, first, then):
    run, ids = str(tmp_path / "run"), tmp_path / "ids"
    ids.mkdir()
    stop, end = (3, 9) if first == 2 else (6, 9)  # 48 of the 96 rows either way, then the other 48
    assert_ok(launch(train_args(prepared, run, ids, stop), nodes=first))
    assert find_resume_point(Path(run)).step == stop
    out = assert_ok(launch(train_args(prepared, run, ids, end), nodes=then))
    assert f"resuming from {run}/checkpoints/last.ckpt (step {stop})" in out
    rows = read_ids(ids)
    assert [r["step"] for r in rows if r["rank"] == 0] == list(range(end))  # the step counter continues
    assert {r["world_size"] for r in rows if r["step"] >= stop} == {then}
    assert torch.load(Path(run) / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == end
    assert_one_epoch(rows)  # the rest of the epoch, re-dealt over the new ranks: nothing twice, nothing skipped


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_both_with_the_divergence_message(prepared, tmp_path):
    run, ids = tmp_path / "run", tmp_path / "ids"
    ids.mkdir()
    args = train_args(
        prepared,
        str(run),
        ids,
        6,
        "--checkpoint.every_n_train_steps",
        "2",
        "--trainer.callbacks+=tests.streaming_helpers.PoisonBatch",
        "--trainer.callbacks.rank",
        "1",
        "--trainer.callbacks.step",
        "3",
    )
    results = launch(args, nodes=2, timeout=240)  # a rank left running would hang in its next all-reduce until killed
    for code, out in results:
        last = out.strip().splitlines()[-1]
        assert code == 2 and last.startswith("error: training diverged at step 3: the loss is NaN/inf on rank 1 of 2"), out[-2000:]
    assert not (run / "model").exists()
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    assert ckpts and all(torch.load(c, weights_only=True)["global_step"] == 2 for c in ckpts)  # the last good step only
