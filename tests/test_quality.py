"""Prototype quality (TAD, probes), consistency and offline FID/KID: known answers and a tiny trained model."""

import pytest
import torch
from torchvision.io import decode_png, read_file

from patronus.cli.analyses import main
from patronus.interpret.consistency import prototype_consistency
from patronus.interpret.generation_metrics import feature_network, fid_kid, write_pngs
from patronus.interpret.localise import edit_each_prototype
from patronus.interpret.quality import auroc_matrix, binary_entropy_and_mi, kfold_indices, prototype_quality, tad
from patronus.runs import export_model
from patronus.torch_utils import to_uint8
from tests.conftest import REPO


def _two_independent_attributes(n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    a0 = torch.tensor([0.0, 0, 1, 1]).repeat(n // 4)
    a1 = torch.tensor([0.0, 1, 0, 1]).repeat(n // 4)
    return a0, a1


def test_tad_on_a_synthetic_case_with_a_known_answer():
    a0, a1 = _two_independent_attributes()
    s = torch.stack([a0, torch.zeros_like(a0), 1 - a1], 1)  # p0 detects a0, p2 detects a1 by firing *less*
    result = tad(s, torch.stack([a0, a1], 1))
    # each attribute: best AUROC 1.0, every other prototype exactly 0.5 -> gap 0.5 each
    assert result.tad == pytest.approx(1.0) and result.captured == [0, 1] and result.best_prototype == [0, 2]
    # a duplicated attribute shares all its information with its twin: both leave TAD (NashAE's filter)
    dup = tad(s, torch.stack([a0, a1, a0], 1))
    assert dup.tad == pytest.approx(0.5) and dup.captured == [1]
    # one prototype carrying both attributes: each still detected (AUROC 0.75), but with no gap to itself
    mixed = torch.stack([a0 + a1, torch.zeros_like(a0)], 1)
    assert auroc_matrix(mixed, torch.stack([a0, a1], 1))[:, 0].tolist() == pytest.approx([0.875, 0.875])


def test_entropy_and_mutual_information_of_binary_attributes():
    a0, a1 = _two_independent_attributes()
    h, mi = binary_entropy_and_mi(torch.stack([a0, a1, a0], 1))
    assert h.tolist() == pytest.approx([torch.log(torch.tensor(2.0)).item()] * 3)
    assert float(mi[0, 1]) == pytest.approx(0.0, abs=1e-12) and float(mi[0, 2]) == pytest.approx(float(h[0]))


def test_auroc_leaves_out_unknown_rows():
    a0, _ = _two_independent_attributes(8)
    s = a0[:, None].clone()
    s[0] = 5.0  # would spoil a perfect detector, but its attribute is unknown
    attrs = a0[:, None].clone()
    attrs[0] = float("nan")
    assert float(auroc_matrix(s, attrs)[0, 0]) == pytest.approx(1.0)


def test_folds_partition_the_rows():
    folds = kfold_indices(23, 5, seed=1)
    held = torch.cat([h for _, h in folds])
    assert sorted(held.tolist()) == list(range(23))
    assert all(len(set(t.tolist()) & set(h.tolist())) == 0 and len(t) + len(h) == 23 for t, h in folds)


def test_probes_are_scored_on_held_out_folds():
    gen = torch.Generator().manual_seed(0)
    n = 1000
    y = torch.randint(0, 2, (n, 2), generator=gen).float()
    labels = torch.randint(0, 4, (n,), generator=gen)
    s = torch.randn(n, 6, generator=gen)
    s[:, 0] += 2 * y[:, 0]  # attribute 0 is linearly readable; attribute 1 is not
    s[:, 3] += 3 * labels  # the class is readable from prototype 3
    report = prototype_quality(s, y, ["readable", "noise"], labels, folds=5).summary()
    assert report["probe_auroc"]["readable"]["mean"] > 0.9
    assert abs(report["probe_auroc"]["noise"]["mean"] - 0.5) < 0.06  # held out: no fitting to noise
    assert report["class_accuracy"]["mean"] > 0.8
    assert report["captured_names"] == ["readable"]
    # pure-noise activations: a probe fit on the training fold would look better than chance on it;
    # on held-out folds it must not
    noise = prototype_quality(torch.randn(n, 6, generator=gen), y, ["a", "b"], folds=5).summary()
    assert noise["probe_auroc_mean"]["mean"] < 0.56 and noise["attributes_captured"]["mean"] == 0


@torch.no_grad()
def test_consistency_scores_match_their_definition(tiny_model, tiny_pipe, mnist_test_images):
    pool = tiny_pipe.encode(mnist_test_images).s
    s_q99 = torch.quantile(pool, 0.99, dim=0)
    top = pool.std(0).argsort(descending=True)[:2].tolist()  # prototypes that vary, so raising them shows
    outcome = edit_each_prototype(tiny_pipe, mnist_test_images[:8], top, s_q99, steps=20)
    scores = prototype_consistency(tiny_pipe, outcome)
    rf = tiny_model.encoder.receptive_field()
    for i, c in enumerate(scores):
        keep = outcome.rise[i] > 0
        assert c.images == int(keep.sum()) >= 2
        centres = rf.start + outcome.cells[i, keep].double() * rf.jump
        assert c.location_spread_px == pytest.approx(float((centres - centres.mean(0)).norm(dim=1).mean()))
        # the scored cells are where prototype J is closest in each edited image
        d = tiny_model.encoder.distance_maps(outcome.edited[i])[:, outcome.prototypes[i]].flatten(1)
        flat = outcome.cells[i, :, 0] * tiny_model.encoder.feature_shape()[1] + outcome.cells[i, :, 1]
        assert torch.equal(d.argmin(1), flat)
        assert c.consistency == pytest.approx(1 - c.feature_spread / c.chance_feature_spread)
        assert c.feature_spread > 0 and c.consistency < 1
    # one image N times: every edit lands on the same patch -> no spread, consistency exactly 1
    b = int(outcome.rise[0].argmax())  # an image where raising top[0] works
    same = edit_each_prototype(tiny_pipe, mnist_test_images[b : b + 1].expand(4, -1, -1, -1), top[:1], s_q99, steps=20)
    (c,) = prototype_consistency(tiny_pipe, same)
    assert c.images == 4 and c.location_spread_px == pytest.approx(0, abs=1e-9) and c.consistency == pytest.approx(1, abs=1e-4)


def test_fid_kid_separate_real_from_corrupted_images(tiny_model):
    from patronus.data.registry import build_dataset

    ds = build_dataset("mnist", str(REPO / "data"), "test", 32)
    x = torch.stack([ds[i]["image"] for i in range(300)])
    real_a, real_b = to_uint8(x[:150]), to_uint8(x[150:])
    feature, extra = feature_network("encoder", tiny_model)
    same = fid_kid(real_a, real_b, feature, extra)
    blurred = fid_kid(real_a, to_uint8(torch.nn.functional.avg_pool2d(x[150:], 3, 1, 1)), feature, extra)
    noise = fid_kid(real_a, to_uint8(torch.rand(150, 1, 32, 32) * 2 - 1), feature, extra)
    assert same["fid"] < blurred["fid"] < noise["fid"]
    assert same["kid_mean"] < blurred["kid_mean"] < noise["kid_mean"]
    with pytest.raises(TypeError, match="uint8"):
        fid_kid(x[:10], x[10:20], feature, extra)


def test_generated_images_are_kept_as_exact_pngs(tmp_path):
    imgs = to_uint8(torch.rand(5, 1, 8, 8) * 2 - 1)
    paths = write_pngs(imgs, tmp_path / "gen")
    assert len(list((tmp_path / "gen").iterdir())) == 5  # not one too many
    assert all(torch.equal(decode_png(read_file(str(p))), img) for p, img in zip(paths, imgs))


def test_feature_networks_need_local_files(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="inception_weights"):
        feature_network("inception", tiny_model)
    with pytest.raises(FileNotFoundError, match="no such file"):
        feature_network("inception", tiny_model, str(tmp_path / "missing.pth"))
    bad = tmp_path / "not_inception.pth"
    torch.save({"weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not an InceptionV3 state dict"):
        feature_network("inception", tiny_model, str(bad))
    with pytest.raises(ValueError, match="feature_weights"):
        feature_network("timm:resnet18", tiny_model)
    with pytest.raises(ValueError, match="expected inception, encoder or timm"):
        feature_network("clip", tiny_model)


@pytest.mark.slow
def test_quality_consistency_and_fid_from_the_cli(tiny_model, tmp_path):
    model_dir = export_model(tiny_model, tmp_path / "model")
    common = ["--checkpoint", str(model_dir), "--data.dataset", "mnist", "--data.root", str(REPO / "data")]
    out = main(["quality", *common, "--num_images", "500"])
    assert out["images"] == 500 and out["attributes"] == [str(d) for d in range(10)] and out["class_accuracy"]["mean"] > 0.2  # chance: 0.1
    assert (model_dir / "analysis" / "quality" / "auroc_matrix.png").is_file()
    out = main(["consistency", *common, "--num_images", "4", "--prototypes", "[1,2]", "--steps", "5"])
    assert [p["prototype"] for p in out["prototypes"]] == [1, 2]
    assert (model_dir / "analysis" / "consistency" / "consistency.png").is_file()
    out = main(["fid", *common, "--num_images", "40", "--batch_size", "20", "--steps", "5"])
    assert out["generated_images"] == 40 and out["fid"] > 0
    assert len(list((model_dir / "analysis" / "fid" / "generated").glob("*.png"))) == 40
