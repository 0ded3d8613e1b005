"""Faithfulness to s: the independent judge on real MNIST, the s cycle and edit gain against their
definitions on the tiny model, the marker rule on cases with a known answer, and the command."""

import json

import numpy as np
import pytest
import torch
import yaml
from torch.nn.functional import one_hot as F_one_hot

from patronus.cli.analyses import main
from patronus.data.registry import build_dataset
from patronus.data.shortcuts import marker_mask, planted_marker
from patronus.interpret.agreement import class_probe, pearson_per_column, probe_pixels, s_cycle, sample_agreement, sample_quality
from patronus.interpret.edit_gain import edit_gain
from patronus.interpret.judge import judge_accuracy, train_judge
from patronus.interpret.marker_effect import marker_effect, marker_prototypes_by_auroc, same_class_partners
from patronus.interpret.marker_rule import marker_detector, marker_rates
from patronus.interpret.stats import activation_statistics, edit_levels
from patronus.runs import export_model
from tests.conftest import REPO

MARKER = {
    "kind": "planted_marker",
    "target": "7",
    "p": 0.9,
    "q": 0.1,
    "shape": "square",
    "size": 4,
    "position": [2, 26],
    "intensity": 1.0,
    "seed": 0,
}


@pytest.fixture(scope="module")
def mnist():
    return build_dataset("mnist", str(REPO / "data"), "train", 32), build_dataset("mnist", str(REPO / "data"), "test", 32)


@pytest.fixture(scope="module")
def judge(mnist):
    """Trained on 3,000 real training digits (2 epochs), plus one extra attribute: 'digit ≥ 5'."""
    train, _ = mnist
    n = 3000
    big = (train.labels[:n] >= 5).float()[:, None]
    big[:100] = float("nan")  # unknown entries are left out of the loss
    return train_judge(train.images[:n], train.labels[:n], big, epochs=2, seed=0, num_classes=10)


def test_the_judge_classifies_real_held_out_digits(judge, mnist):
    _, test = mnist
    x, y = test.images[:1000], test.labels[:1000]
    acc = judge_accuracy(judge, x, y, (y >= 5).float()[:, None])
    assert acc.images == 1000 and acc.class_accuracy > 0.9  # chance: 0.1
    assert float(acc.attribute_accuracy[0]) > 0.85 and float(acc.attribute_balanced_accuracy[0]) > 0.85
    pred = judge.predict(x[:50])
    assert float((pred.classes == y[:50]).float().mean()) == pytest.approx(float((judge.predict(x).classes[:50] == y[:50]).float().mean()))
    with pytest.raises(ValueError, match="labels"):
        train_judge(x[:10], y[:9], epochs=1)
    with pytest.raises(ValueError, match="judge_epochs"):
        train_judge(x[:10], y[:10], epochs=0)


def test_class_probe_reads_the_class_only_where_the_features_carry_it():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(600) % 4
    informative = F_one_hot(y, 4) * 3 + torch.randn(600, 4, generator=g) * 0.3  # class written into s
    noise = torch.randn(600, 6, generator=g)
    s = torch.cat([informative, noise], 1)
    assert class_probe(s[:400], y[:400], s[400:], y[400:]) > 0.95  # scored on rows it was not fitted on
    assert class_probe(noise[:400], y[:400], noise[400:], y[400:]) < 0.4  # chance: 0.25
    y_unknown = y.clone()
    y_unknown[:100] = -1  # unlabelled rows are left out of the fit and of the score
    y_unknown[500:] = -1
    assert class_probe(s[:400], y_unknown[:400], s[400:], y_unknown[400:]) > 0.95
    with pytest.raises(ValueError, match="labels"):
        class_probe(noise[:400], torch.zeros(400, dtype=torch.long), noise[400:], y[400:])


def test_the_pixel_probe_reads_real_digits_far_above_chance(mnist):
    train, test = mnist  # real MNIST digits: a linear read of their pooled pixels gets most of them
    fit, held = probe_pixels(train.images[:2000]), probe_pixels(test.images[:500])
    assert fit.shape == (2000, 16 * 16)
    assert class_probe(fit, train.labels[:2000], held, test.labels[:500]) > 0.8
    shuffled = train.labels[:2000][torch.randperm(2000, generator=torch.Generator().manual_seed(0))]
    assert class_probe(fit, shuffled, held, test.labels[:500]) < 0.3  # labels it cannot read: chance


def test_sample_quality_separates_real_digits_from_noise(judge, mnist):
    _, test = mnist
    real = test.images[:600]
    noise = torch.rand(100, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    good = sample_quality(judge, test.images[600:700], real)
    bad = sample_quality(judge, noise, real)
    assert good["real_images"] == 500 and good["generated_images"] == 100
    assert good["judge_fid_real"] == pytest.approx(bad["judge_fid_real"])  # the floor does not depend on the samples
    assert good["judge_fid"] < 2 * good["judge_fid_real"] + 1 < bad["judge_fid"] / 5
    with pytest.raises(ValueError, match="real"):
        sample_quality(judge, noise, real[:101])


def test_pearson_and_s_cycle_match_numpy_and_skip_constant_prototypes():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(20, 4, generator=g)
    gen = torch.stack([ref + 0.3 * torch.rand(20, 4, generator=g), torch.rand(20, 4, generator=g)])
    ref[:, 3] = 0.5  # a constant prototype has no correlation
    mean, per = s_cycle(ref, gen)
    x, y = ref.repeat(2, 1).numpy(), gen.reshape(40, 4).numpy()
    expect = [np.corrcoef(x[:, j], y[:, j])[0, 1] for j in range(3)]
    assert per[:3].tolist() == pytest.approx(expect, abs=1e-5) and per[3].isnan()
    assert mean == pytest.approx(float(np.mean(expect)), abs=1e-5)
    assert pearson_per_column(ref, ref)[:3].tolist() == pytest.approx([1.0] * 3, abs=1e-6)


@torch.no_grad()
def test_sample_agreement_and_s_cycle_equal_an_independent_recomputation(tiny_pipe, judge, mnist_test_images, mnist):
    refs, y = mnist_test_images, mnist[1].labels[:16]
    res = sample_agreement(tiny_pipe, refs, judge, samples_per_ref=2, steps=5, seed=3, labels=y)
    assert res.samples.shape == (2, 16, 1, 32, 32) and res.s_generated.shape == (2, 16, 8)
    # the samples are the pipeline's, from one seeded noise stream
    gen = torch.Generator().manual_seed(3)
    s = tiny_pipe.encode(refs).s
    first, second = tiny_pipe.sample(s, generator=gen, steps=5), tiny_pipe.sample(s, generator=gen, steps=5)
    torch.testing.assert_close(res.samples, torch.stack([first, second]))
    # the s cycle: per prototype, Pearson over the 32 (reference, sample) pairs, then the mean
    s_gen = torch.stack([tiny_pipe.encode(first).s, tiny_pipe.encode(second).s])
    x, z = s.repeat(2, 1).double().numpy(), s_gen.reshape(32, 8).double().numpy()
    r = np.array([np.corrcoef(x[:, j], z[:, j])[0, 1] for j in range(8)])
    assert res.s_cycle_per_prototype.tolist() == pytest.approx(r.tolist(), abs=1e-4)
    assert res.s_cycle == pytest.approx(float(np.nanmean(r)), abs=1e-4)
    # agreement: the judge on samples vs the judge on references / the true labels
    ref_cls, smp_cls = judge.predict(refs).classes, judge.predict(torch.cat([first, second])).classes.view(2, 16)
    assert res.class_agreement == pytest.approx(float((smp_cls == ref_cls).float().mean()))
    assert res.label_agreement == pytest.approx(float((smp_cls == y).float().mean()))
    assert res.reference_accuracy == pytest.approx(float((ref_cls == y).float().mean()))
    smp_big, ref_big = judge.predict(torch.cat([first, second])).attributes[:, 0].view(2, 16), judge.predict(refs).attributes[:, 0]
    assert float(res.attribute_agreement[0]) == pytest.approx(float((smp_big == ref_big).float().mean()))


@torch.no_grad()
def test_raised_and_lowered_prototypes_move_towards_their_targets(tiny_pipe, mnist):
    pool = mnist[1].images[:300]
    stats = activation_statistics(tiny_pipe.encode(pool).s)
    levels = edit_levels(stats)
    prototypes = torch.tensor(stats["std"]).argsort(descending=True)[:2].tolist()
    x0 = pool[:12]
    res = edit_gain(tiny_pipe, x0, prototypes, levels, steps=10)
    for d, level in ((res.raised, "q99"), (res.lowered, "q01")):
        assert d.images.shape == (2, 12, 1, 32, 32)
        # the definition, recomputed from the decodes themselves
        s_rec = tiny_pipe.encode(res.reconstruction).s
        for p, j in enumerate(prototypes):
            target = float(levels[level][j])
            s_dec = tiny_pipe.encode(d.images[p]).s
            gap = target - s_rec[:, j]
            keep = gap.abs() >= 0.1 * float(levels["q99"][j] - levels["q01"][j])
            expect = ((s_dec[keep, j] - s_rec[keep, j]) / gap[keep]).mean()
            assert float(d.gain[p]) == pytest.approx(float(expect), abs=1e-4) and int(d.counted[p]) == int(keep.sum())
            assert float(d.pixel_change[p]) == pytest.approx(float((d.images[p] - res.reconstruction).abs().mean()), abs=1e-6)
        # the sign convention makes a working edit positive in both directions
        assert float(d.gain.mean()) > 0, (level, d.gain)
        assert float(d.pixel_change.mean()) > 0
    assert float(res.raised.s[0, :, prototypes[0]].mean()) > float(res.s_reconstruction[:, prototypes[0]].mean())
    assert float(res.lowered.s[0, :, prototypes[0]].mean()) < float(res.s_reconstruction[:, prototypes[0]].mean())
    with pytest.raises(ValueError, match="prototypes"):
        edit_gain(tiny_pipe, x0, [8], levels, steps=2)


def _stamp(images: torch.Tensor, masks: torch.Tensor, value: float = 1.0) -> torch.Tensor:
    return images * (1 - masks) + value * masks


def test_marker_rule_on_synthetic_images_with_a_known_answer():
    g = torch.Generator().manual_seed(0)
    background = lambda n: 0.2 * torch.rand(n, 1, 32, 32, generator=g) - 1  # noqa: E731  dark, like MNIST's background
    fixed = marker_mask(4, 32, 2, 26, "square")
    unmarked, marked_plain = background(10), background(8)
    masks = fixed.expand(8, 1, 32, 32)
    det = marker_detector(unmarked, _stamp(marked_plain, masks), masks)
    assert det.rule == "mask" and det.polarity == 1.0 and det.real_accuracy == 1.0
    assert det.threshold == pytest.approx((det.unmarked_score + det.marked_score) / 2)
    # decodes: the marker drawn on 3 of 4 raised images, removed from 1 of 4 lowered ones
    raised = torch.cat([_stamp(background(3), fixed.expand(3, 1, 32, 32)), background(1)])
    lowered = torch.cat([background(1), _stamp(background(3), fixed.expand(3, 1, 32, 32))])
    rates = marker_rates(det, raised, lowered, background(4), _stamp(background(4), fixed.expand(4, 1, 32, 32)))
    assert (rates.drawn, rates.removed, rates.drawn_in_reconstruction, rates.kept_in_reconstruction) == (0.75, 0.25, 0.0, 1.0)
    # a marker drawn elsewhere is not the fixed-position marker
    assert not bool(det.present(_stamp(background(1), marker_mask(4, 32, 20, 4, "square")[None])).any())

    # random positions: the brightest marker-sized window decides, wherever the marker sits
    corners = torch.randint(0, 29, (8, 2), generator=g)
    rmasks = torch.stack([marker_mask(4, 32, int(t), int(l), "square") for t, l in corners])
    det = marker_detector(unmarked, _stamp(marked_plain, rmasks), rmasks)
    assert det.rule == "window" and det.window == (4, 4) and det.real_accuracy == 1.0
    moved = _stamp(background(2), torch.stack([marker_mask(4, 32, 0, 0, "square"), marker_mask(4, 32, 27, 13, "square")]))
    assert det.present(moved).tolist() == [True, True] and det.present(background(3)).tolist() == [False] * 3

    # a dark marker on a bright background: the same rule with the polarity flipped
    bright = lambda n: 1 - 0.2 * torch.rand(n, 1, 32, 32, generator=g)  # noqa: E731
    det = marker_detector(bright(6), _stamp(bright(6), masks[:6], -1.0), masks[:6])
    assert det.polarity == -1.0 and det.present(_stamp(bright(2), masks[:2], -1.0)).all() and not det.present(bright(2)).any()
    with pytest.raises(ValueError, match="masks"):
        marker_detector(unmarked, marked_plain, torch.zeros(8, 1, 32, 32))


def test_marker_prototypes_are_the_ones_that_fire_on_the_marker():
    g = torch.Generator().manual_seed(0)
    marker = (torch.rand(400, generator=g) < 0.3).float()
    noise = lambda: 0.2 * torch.randn(400, generator=g)  # noqa: E731
    s = torch.stack([noise(), marker + noise(), noise(), 0.8 * marker + noise(), 1 - marker + noise()], 1)
    picked, auc = marker_prototypes_by_auroc(s, marker)
    assert picked == [1, 3] or picked == [3, 1]
    assert float(auc[4]) < 0.1  # fires *less* on the marker: raising it would not draw one
    weak = torch.stack([noise(), 0.1 * marker + noise()], 1)
    assert marker_prototypes_by_auroc(weak, marker)[0] == [1]  # none reaches 0.9: the best one
    with pytest.raises(ValueError, match="marker"):
        marker_prototypes_by_auroc(s, torch.zeros(400))


@torch.no_grad()
def test_marker_effect_on_real_images_from_barely_noised_latents(tiny_pipe, mnist):
    """One inverted step of ten leaves almost nothing to redraw: the decodes are the images, so the
    marker is neither drawn nor removed, whatever the edit asks — a known answer through the real path."""
    ds, _ = planted_marker(mnist[1], 32, target=7, p=1.0, q=0.0, size=4, position=(2, 26))
    marked_rows = ds.has_marker.nonzero().flatten()[:6].tolist()
    unmarked_rows = (~ds.has_marker).nonzero().flatten()[:6].tolist()
    marked = torch.stack([ds[i]["image"] for i in marked_rows])
    masks = torch.stack([ds[i]["marker_mask"] for i in marked_rows])
    unmarked = torch.stack([ds[i]["image"] for i in unmarked_rows])
    levels = edit_levels(activation_statistics(tiny_pipe.encode(mnist[1].images[:200]).s))
    eff = marker_effect(tiny_pipe, unmarked, marked, masks, [0, 1], levels, steps=10, inverted_steps=1)
    assert eff.detector.rule == "mask" and eff.detector.real_accuracy == 1.0
    r = eff.rates
    assert (r.drawn, r.removed, r.drawn_in_reconstruction, r.kept_in_reconstruction) == (0.0, 0.0, 0.0, 1.0)
    assert eff.raised.shape == unmarked.shape and eff.lowered.shape == marked.shape and eff.s_raised.shape == (6, 2)
    refs = eff.references
    assert refs.removed_by_swap == 0.0  # the marked latents keep the marker under any s: nothing left to redraw
    fresh = [refs.drawn_from_noise, refs.drawn_from_noise_unedited, refs.removed_from_noise, refs.removed_from_noise_unedited]
    assert all(0.0 <= v <= 1.0 for v in fresh)
    assert (
        marker_effect(tiny_pipe, unmarked, marked, masks, [0, 1], levels, steps=10, inverted_steps=1, references=False).references is None
    )


def test_same_class_partners_take_turns_within_the_class():
    labels, partners = torch.tensor([1, 1, 0, 1, 2]), torch.tensor([0, 1, 1, 0])
    # class 1 → partners 1, 2 in turn; class 0 → partner 0 first; class 2 has none → everyone in turn (index 4 % 4)
    assert same_class_partners(labels, partners, 5, 4).tolist() == [1, 2, 0, 1, 0]
    assert same_class_partners(None, partners, 5, 4).tolist() == [0, 1, 2, 3, 0]


def test_faithfulness_command_end_to_end(tiny_model, tmp_path, capsys):
    run = tmp_path / "run"
    export_model(tiny_model, run / "model")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"dataset": "mnist", "root": str(REPO / "data"), "shortcut": MARKER}}))
    out = main(
        [
            "faithfulness",
            "--checkpoint",
            str(run),
            "--num_images",
            "16",
            "--steps",
            "5",
            "--judge_epochs",
            "1",
            "--judge_images",
            "2000",
            "--num_edit_prototypes",
            "2",
        ]
    )
    folder = run / "analysis" / "faithfulness"
    assert json.loads((folder / "faithfulness.json").read_text()) == json.loads(json.dumps(out))
    for name in ("agreement", "edits_raise", "edits_lower", "marker"):
        assert (folder / f"{name}.png").is_file(), name
    j = out["judge"]
    assert j["training_images"] == 2000 and j["held_out_images"] == 1000 and j["attributes"] == ["marker"]
    assert j["class_accuracy"] > 0.8 and j["attribute_accuracy"]["marker"] > 0.9
    a = out["agreement"]
    assert out["images"] == 16 and 0 <= a["class_agreement"] <= 1 and 0 <= a["attribute_agreement"]["marker"] <= 1
    assert 0 <= a["s_class_probe"] <= 1 and a["pixel_class_probe"] > 0.7  # real digits, read linearly
    q = out["sample_quality"]
    assert q["generated_images"] == 16 and q["real_images"] == 1000 - 16 and q["judge_fid"] > 0 and q["judge_fid_real"] > 0
    assert -1 <= out["s_cycle"]["mean"] <= 1 and len(out["s_cycle"]["per_prototype"]) == 8
    assert len(out["edits"]["prototypes"]) == 2 and set(out["edits"]["raise"]["gain"]) == {str(j) for j in out["edits"]["prototypes"]}
    m = out["marker"]
    assert m["unmarked_images"] == 16 and m["marked_images"] == 16 and m["detector"]["rule"] == "mask"
    assert m["prototypes"] and 0 <= m["drawn_rate"] <= 1 and 0 <= m["removed_rate"] <= 1
    assert set(m["references"]) == {
        "removed_by_swap",
        "drawn_from_noise",
        "drawn_from_noise_unedited",
        "removed_from_noise",
        "removed_from_noise_unedited",
    } and all(0 <= v <= 1 for v in m["references"].values())
    with pytest.raises(SystemExit) as exit_info:
        main(["faithfulness", "--checkpoint", str(run), "--inverted_steps", "999"])
    assert exit_info.value.code == 2 and "inverted_steps=999" in capsys.readouterr().err
