"""benchmarks/loader_throughput.py runs on real files and a real litdata folder (numbers, not their size)."""

import json
import math
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import loader_throughput  # noqa: E402


def make_prepared(folder, n: int = 300) -> None:
    """A litdata.optimize folder of PneumoniaMNIST-sized items, as `python -m patronus prepare` might write."""
    litdata = pytest.importorskip("litdata")
    litdata.optimize(fn=item, inputs=list(range(n)), output_dir=str(folder), chunk_bytes="64KB", num_workers=1, verbose=False)


def item(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {"image": torch.from_numpy(rng.integers(0, 255, (1, 32, 32), dtype=np.uint8)), "label": i % 2}


@pytest.mark.slow  # ~100 s on 2 busy cores: two presets' data, a litdata folder, worker start-ups
def test_every_preset_and_a_prepared_folder_get_finite_numbers(shared_datasets, tmp_path, monkeypatch):
    make_prepared(tmp_path / "prepared")
    out = tmp_path / "loader.json"
    res = loader_throughput.main(
        [
            "--shared",
            str(shared_datasets),
            "--presets",
            "pneumoniamnist_paper",
            "chexpert_paper",
            "--workers",
            "0",
            "1",
            "--batches",
            "2",
            "--warmup",
            "1",
            "--out",
            str(out),
            "--prepared",
            f"pneumoniamnist_paper={tmp_path / 'prepared'}",
            "--no-measure-gpu",
        ]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert "40% MFU of 989 TFLOP/s" in res["step_rate_source"]  # the assumption is stated
    for e in res["presets"].values():
        assert "skipped" not in e, e
        assert set(e["raw"]) == {"0", "1"} and all(r["img_per_s"] > 0 for r in e["raw"].values())
        assert e["workers_needed"] >= 1 and math.isfinite(e["step_img_per_s"])
    chex, pneu = res["presets"]["chexpert_paper"], res["presets"]["pneumoniamnist_paper"]
    assert chex["image_size"] == 224 and chex["stand_in"] and pneu["stand_in"] is None
    assert chex["gflop_per_image"] > 40 * pneu["gflop_per_image"]  # 49x the pixels, attention at 56x56
    prepared = res["prepared"][f"pneumoniamnist_paper={tmp_path / 'prepared'}"]
    assert "skipped" not in prepared, prepared
    assert prepared["by_workers"]["0"]["images"] == 2 * 128 and prepared["workers_needed"] >= 1

    monkeypatch.setitem(sys.modules, "litdata", None)  # not installed: a note, not a crash
    res = loader_throughput.main(
        [
            "--shared",
            str(shared_datasets),
            "--presets",
            "pneumoniamnist_paper",
            "--workers",
            "0",
            "--batches",
            "1",
            "--warmup",
            "0",
            "--out",
            str(out),
            "--prepared",
            str(tmp_path / "x"),
        ]
    )
    assert res["prepared"][str(tmp_path / "x")]["skipped"].startswith("litdata is not installed")
