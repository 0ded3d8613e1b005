"""Shortcut report: the explained-away score on synthetic cases with a known answer, the pieces it is
built from, the fine-tuning hold, and the whole report on a tiny model trained on a planted marker."""

import json

import pytest
import torch
import yaml
from torchvision.io import ImageReadMode, decode_image

from patronus.cli.analyses import main
from patronus.diffusion import diffusion_loss
from patronus.edits import set_prototypes
from patronus.interpret.report import ReportData, build_report
from patronus.interpret.shortcut_report import (
    LinearProbe,
    association,
    box_hits_mask,
    counterfactual_flips,
    location_concentration,
    mask_coverage,
    split_targets,
    stratified_auroc,
)
from patronus.interpret.stats import activation_statistics
from patronus.models.patronus import PatronusModel
from patronus.pipeline import PatronusPipeline
from patronus.runs import export_model
from tests.conftest import REPO, TINY_NET, train_tiny
from tests.wandb_records import read_run

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


def planted(n: int = 3000, seed: int = 0):
    """Four classes; a marker on 90% of class 3 and 5% of the rest. p0 sees the marker, p1 class 3,
    p2 class 1, p3 nothing, p4 class 3 *and* the marker (half-shortcut)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    marker = torch.where(y == 3, torch.rand(n, generator=g) < 0.9, torch.rand(n, generator=g) < 0.05).float()
    noise = lambda: 0.3 * torch.randn(n, generator=g)  # noqa: E731
    is3, is1 = (y == 3).float(), (y == 1).float()
    s = torch.stack([marker + noise(), is3 + noise(), is1 + noise(), noise(), 0.5 * is3 + 0.5 * marker + noise()], 1)
    attrs = torch.cat([torch.nn.functional.one_hot(y, 4).float(), marker[:, None]], 1)
    return s, y, marker, attrs, ["0", "1", "2", "3", "marker"]


def test_targets_default_to_the_class_label_and_the_rest_are_candidate_confounders():
    s, y, marker, attrs, names = planted(200)
    t, t_names, c, c_names = split_targets(attrs, names, y, ["0", "1", "2", "3"])
    assert t_names == ["class=0", "class=1", "class=2", "class=3"] and c_names == ["marker"]
    torch.testing.assert_close(t, attrs[:, :4])
    torch.testing.assert_close(c[:, 0], marker)
    t, t_names, c, c_names = split_targets(attrs, names, torch.full((200,), -1), [], targets=["marker"])
    assert t_names == ["marker"] and c_names == ["0", "1", "2", "3"]
    with pytest.raises(ValueError, match="Smiling"):
        split_targets(attrs, names, y, [], targets=["Smiling"])


def test_stratified_auroc_equals_pair_counting_within_strata():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(120, 2, generator=g)
    target = (torch.rand(120, generator=g) < 0.4).float()
    stratum = (torch.rand(120, generator=g) < 0.5).float()
    got = stratified_auroc(s, target, stratum)
    wins = pairs = 0.0
    for v in (0, 1):
        pos = s[(stratum == v) & (target == 1), 0]
        neg = s[(stratum == v) & (target == 0), 0]
        wins += float((pos[:, None] > neg[None]).sum())
        pairs += len(pos) * len(neg)
    assert got[0].item() == pytest.approx(wins / pairs, abs=1e-5)


def test_the_marker_detector_ranks_first_and_the_genuine_detector_scores_near_zero():
    s, y, marker, attrs, names = planted()
    t, t_names, c, c_names = split_targets(attrs, names, y, ["0", "1", "2", "3"])
    a = association(s, t, t_names, c, c_names)
    assert a.ranking()[0] == 0
    assert t_names[int(a.target_of[0])] == "class=3" and c_names[int(a.confounder_of[0])] == "marker"
    # p0 predicts class 3 overall (AUROC ≈ 0.92) but not within marked or unmarked images
    assert a.auroc[3, 0] > 0.85 and a.score[0] > 0.35
    assert a.score[1] < 0.03 and a.score[2] < 0.03 and a.score[3] < 0.03  # genuine detectors and noise
    assert 0.05 < a.score[4] < a.score[0]  # half shortcut: in between
    assert a.phi[3, 0] > 0.7


def test_location_concentration_is_one_for_a_fixed_spot_and_low_for_a_moving_one():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(500, 2, generator=g)
    where = torch.stack([torch.full((500,), 7), torch.randint(0, 100, (500,), generator=g)], 1)
    conc = location_concentration(s, where)
    assert conc[0] == 1.0 and conc[1] < 0.2


def test_counterfactuals_find_the_prototype_behind_the_mistakes():
    s, y, marker, attrs, names = planted(6000, seed=2)
    s = s[:, :4]  # no half-shortcut: one clear culprit
    is3 = (y == 3).long()
    probe = LinearProbe.fit(s, is3)
    lo, med, hi = (torch.quantile(s, q, dim=0) for q in (0.01, 0.5, 0.99))
    cf = counterfactual_flips(probe, s, is3, {"low": lo, "median": med, "high": hi})
    assert cf.mistakes > 20
    fixed = torch.tensor(cf.fixed_by)
    assert int(fixed.argmax()) in (0, 1) and fixed[0] > 2 * fixed[3]  # noise only flips borderline cases
    # marked non-3s called 3: removing the marker (p0 → low) fixes them
    wrong = probe.proba(s).argmax(1) != is3
    false_pos = wrong & (is3 == 0) & (marker == 1)
    edited = set_prototypes(s, [0], lo)
    assert false_pos.sum() > 5 and (probe.proba(edited[false_pos]).argmax(1) == 0).float().mean() > 0.8


def test_boxes_and_maps_are_scored_against_the_mask():
    mask = torch.zeros(1, 32, 32)
    mask[:, 2:6, 26:30] = 1
    assert box_hits_mask((0, 20, 15, 32), mask) and not box_hits_mask((10, 10, 25, 25), mask)
    assert box_hits_mask((0, 28, 8, 32), mask) and not box_hits_mask((0, 28, 8, 32), mask, share=0.6)  # half of it
    maps = torch.zeros(2, 32, 32)
    maps[:, 2:6, 26:30] = 3.0
    maps[:, 20, 20] = 16.0
    inside, area = mask_coverage(maps, torch.stack([mask, mask]))
    assert inside == pytest.approx(48 / 64) and area == pytest.approx(16 / 1024)


def test_held_prototypes_get_no_gradient_from_the_denoising_loss():
    torch.manual_seed(0)
    net = PatronusModel(**TINY_NET)
    x0 = torch.rand(4, 1, 32, 32) * 2 - 1
    sched = net.noise_scheduler()
    for held, expect_zero in (({2: 0.1}, True), (None, False)):
        net.zero_grad()
        torch.manual_seed(1)
        loss, _ = diffusion_loss(net, sched, x0, held=held)
        loss.backward()
        grad = net.encoder.prototypes.grad
        assert (grad[2].abs().max() == 0) == expect_zero
        assert grad[3].abs().max() > 0


@pytest.fixture(scope="module")
def marker_run(tmp_path_factory):
    """A tiny model trained on the embedded MNIST subset with a planted marker on most 7s."""
    run = tmp_path_factory.mktemp("marker_run")
    net = train_tiny(run, max_steps=400, shortcut=MARKER).net.eval()
    export_model(net, run / "model")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"dataset": "mnist", "root": str(REPO / "data"), "shortcut": MARKER}}))
    torch.set_grad_enabled(True)
    return run


@pytest.mark.slow
def test_report_on_a_planted_marker_ranks_the_marker_prototype_first(marker_run):
    out = main(
        [
            "shortcuts",
            "--checkpoint",
            str(marker_run),
            "--data.split",
            "test",
            "--num_images",
            "1000",
            "--top",
            "2",
            "--num_refs",
            "8",
            "--steps",
            "10",
            "--info_timesteps",
            "6",
            "--info_noise",
            "1",
            "--wandb",
            "true",
        ]
    )
    first = out["ranking"][0]
    assert out["candidate_confounders"] == ["marker"] and out["flagged"][0] == first["prototype"]
    assert first["target"] == "class=7" and first["confounder"] == "marker" and first["score"] > 0.3
    assert first["auroc_confounder"] > 0.9 and out["ranking"][1]["score"] < first["score"] / 3
    # ground truth the score never saw: the dataset's marker masks
    assert first["hits_on_confounder_images"] >= 0.75 and first["boxes_on_confounder"] >= 0.75
    assert first["map_mass_on_confounder"] > 3 * first["confounder_area"]
    report = (marker_run / "analysis" / "shortcuts" / "report.md").read_text()
    assert f"p{first['prototype']} ⚠" in report
    for name in ("auroc_matrix", "ranking", "causal", "where_boxes", "where_maps", "when_curves", "mitigation"):
        assert (marker_run / "analysis" / "shortcuts" / f"{name}.png").is_file()
    held = yaml.safe_load((marker_run / "analysis" / "shortcuts" / "finetune_held.yaml").read_text())
    assert first["prototype"] in held["model"]["held_prototypes"] and held["run_dir"] == f"{marker_run}_held"
    m = out["mitigation"]  # samples from marked images' s, the finding at its neutral value: less marker
    assert m["images"] > 0 and m["confounder_intensity_after"] < m["confounder_intensity_before"]
    f = out["findings"][0]  # one finding for the marker, its carriers together, calibrated
    assert first["prototype"] in f["prototypes"] and f["confounder"] == "marker" and f["p_value"] <= 0.05
    assert out["verdict"].startswith("Shortcut found") and "marker" in out["verdict"]
    assert f["neutral_from"].endswith("without the confounder") and 0 <= f["worst_group"]["before"] <= 1
    html = (marker_run / "analysis" / "shortcuts" / "report.html").read_text()
    assert html.index(out["verdict"][:20]) < html.index("<h1>") and "data:image/png;base64," in html
    assert json.loads((marker_run / "analysis" / "shortcuts" / "shortcuts.json").read_text())["flagged"] == out["flagged"]
    assert out["report"] == str(marker_run / "analysis" / "shortcuts" / "report.md")
    # the same report in its offline wandb run: verdict in the summary, report.html and every figure logged
    (folder,) = (marker_run / "analysis" / "wandb").glob("offline-run-*")
    logged = read_run(folder)
    assert logged.job_type == "shortcut-report" and logged.summary["shortcuts/verdict"] == out["verdict"]
    row = next(r for r in logged.history if "shortcuts/report" in r)
    assert row["shortcuts/report"]["_type"] == "html-file"
    assert out["verdict"][:20] in (folder / "files" / row["shortcuts/report"]["path"]).read_text()
    causal = row["shortcuts/causal"]
    logged_png = decode_image(str(folder / "files" / causal["path"]), mode=ImageReadMode.RGB)
    assert torch.equal(logged_png, decode_image(str(marker_run / "analysis" / "shortcuts" / "causal.png"), mode=ImageReadMode.RGB))


def test_build_report_names_the_bad_input():
    pipe = PatronusPipeline(model=PatronusModel(**TINY_NET))
    n = 6
    data = ReportData(torch.zeros(n, 1, 32, 32), torch.zeros(n, dtype=torch.long), torch.zeros(n, 1), ["a"], ["0"])
    stats = activation_statistics(torch.rand(50, 8))
    with pytest.raises(ValueError, match="num_refs"):
        build_report(pipe, data, stats, num_refs=0)
    with pytest.raises(ValueError, match="steps"):
        build_report(pipe, data, stats, steps=0)
    with pytest.raises(ValueError, match="stats"):
        build_report(pipe, data, {"q99": [1.0] * 8})
    with pytest.raises(ValueError, match="stats"):
        build_report(pipe, data, activation_statistics(torch.rand(50, 3)))
    with pytest.raises(ValueError, match="attribute_names"):
        ReportData(torch.zeros(n, 1, 32, 32), torch.zeros(n, dtype=torch.long), torch.zeros(n, 1), ["a", "b"], [])
    with pytest.raises(ValueError, match="labels"):
        ReportData(torch.zeros(n, 1, 32, 32), torch.zeros(n + 1, dtype=torch.long), torch.zeros(n, 1), ["a"], [])


def test_finetuning_starts_from_saved_weights_and_checks_held_prototypes(tmp_path):
    from patronus.training.module import PatronusModule

    torch.manual_seed(0)
    saved = export_model(PatronusModel(**TINY_NET), tmp_path / "model")
    torch.manual_seed(1)
    module = PatronusModule(PatronusModel(**TINY_NET), init_from=str(saved), held_prototypes={"3": 0.05})
    torch.testing.assert_close(module.net.encoder.prototypes, PatronusModel.from_pretrained(saved).encoder.prototypes)
    assert module.held == {3: 0.05}
    with pytest.raises(ValueError, match="K=8"):
        PatronusModule(PatronusModel(**TINY_NET), held_prototypes={8: 0.1})
