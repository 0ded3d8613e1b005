"""Shortcut builders on real data: deterministic, correlations as requested, ground truth recorded."""

import pytest
import torch

from patronus.cli.shortcut_data import main
from patronus.data.datasets import LabelledImageDataset
from patronus.data.registry import build_dataset
from patronus.data.shortcuts import apply_shortcut, celeba_hair_smile, correlated_subset, phi, planted_marker
from tests.conftest import REPO


@pytest.fixture(scope="module")
def mnist():
    return build_dataset("mnist", str(REPO / "data"), "test", 32)


def test_planted_marker_follows_p_and_q_and_records_ground_truth(mnist):
    ds, report = planted_marker(mnist, 32, target="1", p=0.9, q=0.05, size=4, position=(2, 26), intensity=1.0, seed=3)
    ones = mnist.labels == 1
    rate_1 = ds.has_marker[ones].float().mean()
    rate_other = ds.has_marker[~ones].float().mean()
    assert abs(rate_1 - 0.9) < 0.05 and abs(rate_other - 0.05) < 0.02
    assert report["phi_target~marker"] > 0.7 and ds.attribute_names[-1] == "marker"
    i = int(ds.has_marker.nonzero()[0])
    item = ds[i]
    assert item["marker_mask"].sum() == 16 and item["attributes"][-1] == 1
    patch = item["image"][0, 2:6, 26:30]
    assert torch.equal(patch, torch.ones(4, 4))  # stamped exactly where the mask says
    outside = item["marker_mask"][0] == 0
    assert torch.equal(item["image"][0][outside], mnist[i]["image"][0][outside])  # nothing else changed
    j = int((~ds.has_marker).nonzero()[0])
    assert torch.equal(ds[j]["image"], mnist[j]["image"]) and ds[j]["marker_mask"].sum() == 0
    again, _ = planted_marker(mnist, 32, target="1", p=0.9, q=0.05, size=4, position=(2, 26), seed=3)
    assert torch.equal(again.has_marker, ds.has_marker)  # deterministic under the seed


def test_random_position_disc_marker_fits_and_varies(mnist):
    ds, _ = planted_marker(mnist, 32, target="7", p=1.0, q=0.0, shape="disc", size=5, position="random", seed=0)
    sevens = (mnist.labels == 7).nonzero().flatten()[:20]
    corners = {tuple(ds.corners[int(i)].tolist()) for i in sevens}
    assert len(corners) > 10
    m = ds[int(sevens[0])]["marker_mask"]
    assert 13 <= m.sum() <= 21 and m.sum() < 25  # a disc, not the 5x5 square


def test_correlated_subset_hits_the_requested_phi(mnist):
    wrapped, _ = planted_marker(mnist, 32, target="3", p=0.5, q=0.5, seed=1)  # marker independent of the digit
    for rho in (0.0, 0.6, 0.9):
        sub, report = correlated_subset(wrapped, "3", "marker", rho, seed=0)
        assert abs(report["phi"]["3~marker"] - rho) < 0.03, report
        assert len(sub) > 100
    again, _ = correlated_subset(wrapped, "3", "marker", 0.6, seed=0)
    assert torch.equal(again.indices, correlated_subset(wrapped, "3", "marker", 0.6, seed=0)[0].indices)


def test_celeba_hair_smile_recipe_on_real_attributes(shared_datasets):
    opts = dict(image_dir="img_align_celeba_89x109", attr_file="list_attr_celeba_000001-010000.txt", partition_file=None)
    ds = build_dataset("celeba", str(shared_datasets / "celeba_subset"), "train", 32, **opts)
    sub, report = celeba_hair_smile(ds)
    black, blond, brown, smile = (
        sub.attributes[:, sub.attribute_names.index(n)] == 1 for n in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Smiling")
    )
    assert torch.all((black.int() + blond.int() + brown.int()) == 1)
    assert torch.all(smile[blond]) and not torch.any(smile[black]) and torch.all(smile[brown])
    # Same selection written out by hand on the attribute table:
    a = ds.attributes
    col = lambda n: a[:, ds.attribute_names.index(n)] == 1  # noqa: E731
    one = (col("Black_Hair").int() + col("Blond_Hair").int() + col("Brown_Hair").int()) == 1
    expected = one & ((col("Blond_Hair") & col("Smiling")) | (col("Black_Hair") & ~col("Smiling")) | (col("Brown_Hair") & col("Smiling")))
    assert len(sub) == int(expected.sum()) and report["rows"] == len(sub)
    assert report["phi"]["Black_Hair~Smiling"] == pytest.approx(-1.0)


def test_config_and_cli_entry_points(mnist, capsys):
    ds, report = apply_shortcut(mnist, 32, {"kind": "planted_marker", "target": "1", "p": 1.0, "q": 0.0})
    assert report["marker_rate_in_target"] == 1.0 and report["marker_rate_elsewhere"] == 0.0
    with pytest.raises(ValueError, match="data.shortcut.kind='watermark'"):
        apply_shortcut(mnist, 32, {"kind": "watermark"})
    with pytest.raises(ValueError, match="data.shortcut \\(planted_marker\\).*colour"):
        apply_shortcut(mnist, 32, {"kind": "planted_marker", "target": "1", "colour": "red"})
    out = main(
        [
            "planted_marker",
            "--data.dataset",
            "mnist",
            "--data.root",
            str(REPO / "data"),
            "--data.split",
            "test",
            "--params",
            '{"target": "1", "p": 0.8, "q": 0.1}',
        ]
    )
    assert '"phi_target~marker"' in capsys.readouterr().out and out["rows"] == 2000


def test_phi_ignores_unknown_rows():
    a = torch.tensor([1.0, 0.0, 1.0, 0.0, float("nan")])
    b = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    assert phi(a, b) == pytest.approx(1.0)


def test_datamodule_applies_the_configured_shortcut_to_every_split():
    from patronus.data.datamodule import PatronusDataModule

    spec = {"kind": "planted_marker", "target": "7", "p": 1.0, "q": 0.0, "size": 4, "position": [2, 26]}
    dm = PatronusDataModule(root=str(REPO / "data"), batch_size=64, train_subset=512, val_subset=128, shortcut=spec)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    has = batch["attributes"][:, -1] == 1
    assert torch.equal(has, batch["label"] == 7) and dm.val_set.attribute_names[-1] == "marker"
    assert torch.all(batch["image"][has][:, 0, 2:6, 26:30] == 1)
    assert len(dm.train_set) == 512 and dm.train_set.attributes.shape[1] == 11


class AttributesOnly(LabelledImageDataset):
    """The label table of a dataset whose images are not here (only the recipe is under test)."""

    def __init__(self, names, values):
        self.attribute_names, self.classes = list(names), []
        self.attributes = torch.from_numpy(values).float()
        self.labels = torch.full((len(values),), -1)


@pytest.mark.slow
def test_hair_smile_recipe_gives_the_papers_61214_rows_on_full_celeba_attributes(shared_datasets, tmp_path):
    import zipfile

    from patronus.data.celeba import read_attributes

    with zipfile.ZipFile(shared_datasets / "celeba_subset" / "list_attr_celeba.zip") as z:
        z.extractall(tmp_path)
    table = read_attributes(tmp_path / "list_attr_celeba.txt", [])
    assert table.rows == 202599
    sub, report = celeba_hair_smile(AttributesOnly(table.names, table.values))
    assert len(sub) == 61214 == report["rows"]  # the count the paper's recipe gives on full CelebA


@pytest.mark.parametrize("shape", ["square", "disc", "ring", "cross", "line", "glyph"])
def test_every_marker_shape_stays_in_its_region_and_is_recorded_in_the_mask(mnist, shape):
    ds, report = planted_marker(mnist, 32, target="3", p=1.0, q=0.0, shape=shape, size=8, position="random", region=[16, 0, 32, 16], seed=1)
    threes = (mnist.labels == 3).nonzero().flatten()[:10]
    masks = torch.stack([ds[int(i)]["marker_mask"] for i in threes])
    assert bool((masks[:, :, :16].sum() == 0) and (masks[:, :, :, 16:].sum() == 0))  # inside rows 16.., cols ..16
    area = int(masks[0].sum())
    assert 0 < area <= 64 and (area == 64) == (shape == "square")
    assert len({tuple(ds.corners[int(i)].tolist()) for i in threes}) > 3
    item = ds[int(threes[0])]
    assert torch.equal(item["image"][0][item["marker_mask"][0] == 1], torch.ones(area))


def test_blended_marker_mixes_with_the_image(mnist):
    ds, _ = planted_marker(mnist, 32, target="1", p=1.0, q=0.0, size=6, position=(0, 0), intensity=1.0, opacity=0.5)
    i = int((mnist.labels == 1).nonzero()[0])
    x, base = ds[i]["image"][0, :6, :6], mnist[i]["image"][0, :6, :6]
    torch.testing.assert_close(x, 0.5 * base + 0.5)
    marked, clean = ds.with_and_without(i)
    assert torch.equal(marked, ds[i]["image"]) and torch.equal(clean, mnist[i]["image"])


def test_marker_options_name_the_bad_field(mnist):
    for bad, field in (
        ({"shape": "star"}, "shape"),
        ({"opacity": 1.5}, "opacity"),
        ({"intensity": 3.0}, "intensity"),
        ({"shape": "glyph", "size": 3}, "size"),
        ({"shape": "glyph", "text": "Q"}, "text"),
        ({"shape": "ring", "thickness": 0}, "thickness"),
        ({"position": "random", "region": [0, 0, 4, 40]}, "region"),
        ({"position": [1, 1], "region": [0, 0, 8, 8]}, "region"),
    ):
        with pytest.raises(ValueError, match=f"shortcut.{field}"):
            planted_marker(mnist, 32, target="1", **{"size": 8, **bad})


def test_a_built_dataset_written_to_disk_reads_back_as_an_attribute_folder_with_masks(tmp_path, capsys):
    params = '{"target": "1", "p": 0.9, "q": 0.05, "shape": "cross", "size": 7, "position": "random", "seed": 2}'
    out = main(
        [
            "planted_marker",
            "--data.dataset",
            "mnist",
            "--data.root",
            str(REPO / "data"),
            "--splits",
            "[test]",
            "--params",
            params,
            "--out_dir",
            str(tmp_path / "built"),
        ]
    )
    assert out["written"] == {"test": 2000} and out["read_with"]["options"] == {"attributes_csv": "attributes.csv", "masks": "masks"}
    back = build_dataset("attribute_folder", str(tmp_path / "built"), "test", 32, channels=1, **out["read_with"]["options"])
    orig, _ = apply_shortcut(
        build_dataset("mnist", str(REPO / "data"), "test", 32), 32, {"kind": "planted_marker", **__import__("json").loads(params)}
    )
    assert back.attribute_names == ["marker"] and back.classes == orig.classes
    assert torch.equal(back.labels, orig.labels) and torch.equal(back.attributes[:, 0], orig.has_marker.float())
    for i in (int(orig.has_marker.nonzero()[0]), int((~orig.has_marker).nonzero()[0])):
        a, b = back[i], orig[i]
        assert (a["image"] - b["image"]).abs().max() < 1 / 127  # 8-bit PNG
        assert torch.equal(a["marker_mask"], b["marker_mask"])
    with pytest.raises(SystemExit):  # refuses to overwrite a dataset by accident
        main(
            [
                "planted_marker",
                "--data.dataset",
                "mnist",
                "--data.root",
                str(REPO / "data"),
                "--splits",
                "[test]",
                "--params",
                params,
                "--out_dir",
                str(tmp_path / "built"),
            ]
        )
    assert "not empty" in capsys.readouterr().err


def test_a_balanced_split_plants_the_marker_independently_of_the_target(tmp_path, capsys):
    """Worst-group accuracy needs every target × marker group populated: SPLIT_balanced has the
    marker on about half of each class, the contaminated split on 90% of the target and 5% of the rest."""
    params = '{"target": "1", "p": 0.9, "q": 0.05, "shape": "square", "size": 4, "seed": 0}'
    out = main(
        [
            "planted_marker",
            "--data.dataset",
            "mnist",
            "--data.root",
            str(REPO / "data"),
            "--splits",
            "[test]",
            "--balanced_splits",
            "[test]",
            "--params",
            params,
            "--out_dir",
            str(tmp_path / "built"),
        ]
    )
    assert out["written"] == {"test": 2000, "test_balanced": 2000}
    opts = out["read_with"]["options"]
    for split, (p, q) in (("test", (0.9, 0.05)), ("test_balanced", (0.5, 0.5))):
        ds = build_dataset("attribute_folder", str(tmp_path / "built"), split, 32, channels=1, **opts)
        ones = ds.labels == ds.classes.index("1")
        marker = ds.attributes[:, 0]
        assert abs(float(marker[ones].mean()) - p) < 0.08 and abs(float(marker[~ones].mean()) - q) < 0.05
    with pytest.raises(SystemExit):
        main(
            [
                "celeba_hair_smile",
                "--data.dataset",
                "mnist",
                "--data.root",
                str(REPO / "data"),
                "--splits",
                "[test]",
                "--balanced_splits",
                "[test]",
                "--out_dir",
                str(tmp_path / "other"),
            ]
        )
    assert "only a planted_marker" in capsys.readouterr().err
