"""benchmarks/loader_throughput.py runs on real files and on their prepared copies (numbers, not their size)."""

import json
import math
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import loader_throughput  # noqa: E402


@pytest.mark.slow  # two presets' data, prepared and read back, worker start-ups
def test_every_preset_and_a_prepared_folder_get_finite_numbers(shared_datasets, tmp_path, monkeypatch):
    pytest.importorskip("litdata")
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
            "--prepare-into",
            str(tmp_path / "prepared"),
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
    for name, prepared in res["prepared"].items():  # each preset written by `prepare`, read back as training reads it
        assert "skipped" not in prepared, prepared
        assert (tmp_path / "prepared" / name / "patronus.json").is_file()
        assert prepared["by_workers"]["0"]["images"] == 2 * res["presets"][name]["batch_size"] and prepared["workers_needed"] >= 1

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
            f"pneumoniamnist_paper={tmp_path / 'prepared' / 'pneumoniamnist_paper'}",
        ]
    )
    assert "pip install litdata" in res["prepared"]["pneumoniamnist_paper"]["skipped"]
