"""The contamination sweep's logic on tiny real runs: silent without a shortcut, the marker first when every 7 carries it."""

import importlib.util
import json

import pytest
import yaml

from patronus.cli.common import DataSource, load_pipeline, run_dataset
from patronus.interpret.quality import auroc_matrix
from patronus.interpret.report import ReportData
from tests.conftest import REPO


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_sweep():
    return load_benchmark("contamination_sweep")


def test_goals_follow_the_issue():
    sweep = load_sweep()
    assert sweep.goals_met({"level": 0.0, "flagged": 0}) is True
    assert sweep.goals_met({"level": 0.0, "flagged": 1}) is False
    row = {"level": 0.8, "flagged": 2, "marker_finding_rank": 1, "marker_auroc": 0.97, "marker_auroc_balanced": 0.96, "box_hit_rate": 0.9}
    assert sweep.goals_met(row) is True and sweep.goals_met({**row, "marker_finding_rank": 2}) is False
    # a prototype that fires on the marked class scores high where the marker goes with the class, not where it does not
    assert sweep.goals_met({**row, "marker_auroc": 0.99, "marker_auroc_balanced": 0.8}) is False
    assert sweep.goals_met({**row, "level": 0.2}) is None  # no goal at 20%


@pytest.mark.slow
def test_quick_sweep_flags_nothing_at_zero_and_finds_the_marker_at_full_contamination(tmp_path):
    # --shortcut lays fields over the marker, --set passes train.py overrides; both end up in the run's config
    rows = load_sweep().main(["--quick", "--out", str(tmp_path), "--shortcut", '{"q": 0.04}', "--set", "trainer.log_every_n_steps=7"])
    zero, full = rows
    config = yaml.safe_load((tmp_path / "square_p100" / "config.yaml").read_text())
    assert config["data"]["shortcut"]["q"] == 0.04 == full["q"] and config["trainer"]["log_every_n_steps"] == 7
    assert zero["level"] == 0.0 and zero["flagged"] == 0 and zero["goals_met"] is True
    assert "No shortcut found" in zero["verdict"]
    assert full["level"] == 1.0 and full["marker_finding_rank"] == 1 and full["marker_auroc"] > 0.9
    # the marker AUROC where the marker is independent of the class: against one computed here on the whole
    # re-planted test set (the report leaves out the 560 images its classifiers were fit on)
    run = tmp_path / "square_p100"
    pipe = load_pipeline(str(run), "cpu")
    balanced = run_dataset(str(run), pipe, DataSource(split="test"), group_balanced=True)
    data = ReportData.from_dataset(balanced, 1600)
    best = json.loads((run / "analysis" / "shortcuts" / "shortcuts.json").read_text())["findings"][0]["prototypes"][0]
    marker = data.attributes[:, data.attribute_names.index("marker")]
    assert 0.3 < marker.mean() < 0.7
    here = float(auroc_matrix(pipe.encode(data.images).s[:, [best]].cpu(), marker[:, None])[0, 0])
    assert abs(full["marker_auroc_balanced"] - here) < 0.03 and full["marker_auroc_balanced"] > 0.9
    assert full["verdict"].startswith("Shortcut found") and full["sensitivity"] > zero["sensitivity"]
    assert json.loads((tmp_path / "sweep.json").read_text()) == rows
    # worst-group accuracy on a group-balanced set: at 100% no held-out 7 lacks the marker, so only the
    # re-planted set has all four groups (the report's images it fit on left out: 1600 read − 560 fit)
    wg = json.loads((tmp_path / "square_p100" / "analysis" / "shortcuts" / "shortcuts.json").read_text())["findings"][0]["worst_group"]
    assert wg["scored_on"] == "a group-balanced held-out set of 1040 images" and len(wg["groups_present"]) == 4
    assert full["worst_group_smallest"] >= 20 and 0 <= full["worst_group_before"] <= 1
    assert (tmp_path / "sweep.md").read_text().count("| square |") == 2 and (tmp_path / "sweep_square.png").is_file()

    # the feature probe: the run's best prototype is at least the finding's, read the same way on the same set,
    # and a prototype fitted with the labels on half the set detects the marker on the other half
    probe = load_benchmark("marker_feature_probe").main(["--run", str(run), "--group_split", "test", "--num_images", "1600"])
    assert probe["images"] == 1600 and probe["trained_best"]["auroc"] >= here - 1e-6
    assert probe["fitted_with_labels_held_out"] > 0.9 and set(probe["contrast_seeds"]) == {"0.0", "0.5", "1.0", "2.0", "4.0"}
    assert json.loads((run / "analysis" / "marker_feature_probe.json").read_text()) == probe

    # fine-tuning with the finding held (the report's finetune_held.yaml), then the marker-drawn rates
    result = load_benchmark("mitigation_finetune").main(
        ["--run", str(tmp_path / "square_p100"), "--steps", "20", "--num_images", "16", "--sampling_steps", "5"]
    )
    held_run = tmp_path / "square_p100_held"
    assert (held_run / "model").is_dir() and (held_run / "mitigation.png").is_file()
    assert json.loads((held_run / "mitigation.json").read_text()) == json.loads(json.dumps(result))
    finding = json.loads((tmp_path / "square_p100" / "analysis" / "shortcuts" / "shortcuts.json").read_text())["findings"][0]
    assert sorted(result["held_prototypes"]) == sorted(finding["prototypes"]) and result["images"] == 16
    assert result["marker_in_real_images"] > 0.9  # the detector sees the real markers
    assert set(result["marker_drawn"]) == {"before", "neutralised", "fine_tuned"}
    assert all(0 <= v <= 1 for v in result["marker_drawn"].values())
