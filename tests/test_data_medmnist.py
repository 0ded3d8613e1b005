"""MedMNIST loader: the real staged .npz files (counts from ../shared/datasets/README.md) and
official-format fixtures written with numpy for the sets that are not staged; every error path."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from patronus.data.medmnist import LABEL_NAMES, medmnist

SPLIT_SIZES = {"train": 4708, "val": 524, "test": 624}


def write_npz(path: Path, images: dict[str, np.ndarray], labels: dict[str, np.ndarray], **extra: np.ndarray) -> Path:
    """An .npz in MedMNIST's convention ({split}_images / {split}_labels)."""
    arrays = {f"{s}_images": a for s, a in images.items()} | {f"{s}_labels": a for s, a in labels.items()} | extra
    np.savez_compressed(path, **arrays)
    return path


def splits(make) -> dict[str, np.ndarray]:
    return {s: make(s, n) for s, n in (("train", 12), ("val", 4), ("test", 6))}


@pytest.fixture(scope="module")
def medmnist_dir(shared_datasets: Path) -> Path:
    return shared_datasets / "medmnist"


# -- real files -------------------------------------------------------------------------------


@pytest.mark.parametrize("split,counts", [("train", [1214, 3494]), ("val", [135, 389]), ("test", [234, 390])])
def test_pneumoniamnist_official_split_sizes_and_class_balance(medmnist_dir, split, counts):
    ds = medmnist(str(medmnist_dir), split, 32, name="pneumoniamnist")
    assert len(ds) == SPLIT_SIZES[split] == sum(counts)
    assert torch.bincount(ds.labels).tolist() == counts
    assert ds.classes == ds.attribute_names == ["normal", "pneumonia"]
    assert torch.equal(ds.attributes, torch.nn.functional.one_hot(ds.labels, 2).float())
    item = ds[0]
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1


def test_pneumoniamnist_pixels_are_the_files_pixels(medmnist_dir):
    ds = medmnist(str(medmnist_dir), "test", 28, name="pneumoniamnist")  # native size: no resampling
    with np.load(medmnist_dir / "pneumoniamnist.npz") as z:
        raw, labels = z["test_images"], z["test_labels"]
    assert torch.equal(ds.images[:, 0], torch.from_numpy(raw).float() / 127.5 - 1)
    assert torch.equal(ds.labels, torch.from_numpy(labels[:, 0].astype(np.int64)))


@pytest.mark.parametrize("split,counts", [("train", [147, 399]), ("val", [21, 57]), ("test", [42, 114])])
def test_breastmnist_split_sizes(medmnist_dir, split, counts):
    ds = medmnist(str(medmnist_dir), split, 32, name="breastmnist")
    assert torch.bincount(ds.labels).tolist() == counts  # 546 / 78 / 156 in all
    assert ds.classes == ["malignant", "normal, benign"]


def test_gray_repeated_to_three_channels_on_request(medmnist_dir):
    ds = medmnist(str(medmnist_dir), "val", 32, name="breastmnist", channels=3)
    x = ds[0]["image"]
    assert x.shape == (3, 32, 32) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_download_flag_uses_an_existing_file_without_the_package(medmnist_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "medmnist", None)  # any import of the package would fail
    assert len(medmnist(str(medmnist_dir), "val", 32, True, name="breastmnist")) == 78


# -- official-format fixtures (sets not staged) -------------------------------------------------


def test_chestmnist_is_multi_label_with_the_14_findings(tmp_path):
    rng = np.random.default_rng(0)
    findings = splits(lambda s, n: rng.integers(0, 2, (n, 14), dtype=np.uint8))
    write_npz(tmp_path / "chestmnist.npz", splits(lambda s, n: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)), findings)
    ds = medmnist(str(tmp_path), "val", 32, name="chestmnist")
    assert len(ds) == 4 and ds.classes == [] and (ds.labels == -1).all()
    assert ds.attribute_names == LABEL_NAMES["chestmnist"] and len(ds.attribute_names) == 14
    assert ds.attribute_names[0] == "atelectasis" and ds.attribute_names[-1] == "hernia"
    assert torch.equal(ds.attributes, torch.from_numpy(findings["val"]).float())
    assert ds[3]["image"].shape == (1, 32, 32)


def test_rgb_dermamnist_like_file(tmp_path):
    rng = np.random.default_rng(1)
    images = splits(lambda s, n: rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8))
    write_npz(tmp_path / "dermamnist.npz", images, splits(lambda s, n: np.arange(n, dtype=np.uint8)[:, None] % 7))
    ds = medmnist(str(tmp_path), "train", 32, name="dermamnist")
    assert ds[0]["image"].shape == (3, 32, 32)
    assert ds.classes[0] == "actinic keratoses and intraepithelial carcinoma" and len(ds.classes) == 7
    assert ds.labels.tolist() == [i % 7 for i in range(12)]
    native = medmnist(str(tmp_path), "train", 28, name="dermamnist", channels=3)
    assert torch.equal(native.images[5], torch.from_numpy(images["train"][5]).permute(2, 0, 1).float() / 127.5 - 1)
    with pytest.raises(ValueError, match=r"dermamnist.npz: train_images holds RGB .*channels=1.*channels=3"):
        medmnist(str(tmp_path), "train", 32, name="dermamnist", channels=1)


def test_64px_file_follows_the_name_size_convention(tmp_path):
    rng = np.random.default_rng(2)
    images = splits(lambda s, n: rng.integers(0, 256, (n, 64, 64), dtype=np.uint8))
    write_npz(tmp_path / "bloodmnist_64.npz", images, splits(lambda s, n: np.full((n, 1), 3, np.uint8)))
    ds = medmnist(str(tmp_path), "test", 64, name="bloodmnist", size=64)
    assert len(ds) == 6 and ds.classes[3].startswith("immature granulocytes")
    assert torch.equal(ds.images[0, 0], torch.from_numpy(images["test"][0]).float() / 127.5 - 1)
    with pytest.raises(FileNotFoundError, match=r"bloodmnist\.npz not found.*it holds \['bloodmnist_64\.npz'\]"):
        medmnist(str(tmp_path), "test", 64, name="bloodmnist")  # size 28 means bloodmnist.npz


def test_unknown_set_falls_back_to_numbered_classes(tmp_path):
    write_npz(
        tmp_path / "mymnist.npz", splits(lambda s, n: np.zeros((n, 28, 28), np.uint8)), splits(lambda s, n: (np.arange(n) % 5)[:, None])
    )
    ds = medmnist(str(tmp_path), "train", 32, name="mymnist")
    assert ds.classes == [f"class_{i}" for i in range(5)] and ds.attributes.shape == (12, 5)


# -- errors ------------------------------------------------------------------------------------


def test_missing_file_names_the_expected_file_and_convention(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pneumoniamnist_128\.npz not found: expected MedMNIST's npz convention"):
        medmnist(str(tmp_path), "train", 32, name="pneumoniamnist", size=128)


def test_missing_key_names_file_and_key(tmp_path):
    np.savez(tmp_path / "breastmnist.npz", train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.zeros((2, 1)))
    with pytest.raises(KeyError, match=r"breastmnist\.npz: no array 'val_images'"):
        medmnist(str(tmp_path), "val", 32, name="breastmnist")


def test_image_label_count_mismatch(tmp_path):
    np.savez(tmp_path / "breastmnist.npz", test_images=np.zeros((5, 28, 28), np.uint8), test_labels=np.zeros((4, 1)))
    with pytest.raises(ValueError, match=r"breastmnist\.npz: 5 test_images but 4 test_labels"):
        medmnist(str(tmp_path), "test", 32, name="breastmnist")


def test_corrupt_npz_is_reported(tmp_path):
    good = write_npz(tmp_path / "x.npz", splits(lambda s, n: np.zeros((n, 28, 28), np.uint8)), splits(lambda s, n: np.zeros((n, 1))))
    (tmp_path / "breastmnist.npz").write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"breastmnist\.npz: .*corrupt or truncated"):
        medmnist(str(tmp_path), "train", 32, name="breastmnist")


def test_image_size_disagreeing_with_the_file_name(tmp_path):
    write_npz(tmp_path / "breastmnist_64.npz", splits(lambda s, n: np.zeros((n, 28, 28), np.uint8)), splits(lambda s, n: np.zeros((n, 1))))
    with pytest.raises(ValueError, match=r"breastmnist_64\.npz: train_images holds 28x28 images, but size=64"):
        medmnist(str(tmp_path), "train", 64, name="breastmnist", size=64)


def test_bad_shapes_and_dtypes(tmp_path):
    write_npz(tmp_path / "organmnist3d.npz", {"train": np.zeros((2, 28, 28, 28), np.uint8)}, {"train": np.zeros((2, 1))})
    with pytest.raises(ValueError, match=r"organmnist3d\.npz: train_images has shape \(2, 28, 28, 28\).*3D"):
        medmnist(str(tmp_path), "train", 32, name="organmnist3d")
    write_npz(tmp_path / "floatmnist.npz", {"train": np.zeros((2, 28, 28), np.float32)}, {"train": np.zeros((2, 1))})
    with pytest.raises(ValueError, match=r"floatmnist\.npz: train_images has dtype float32; MedMNIST images are uint8"):
        medmnist(str(tmp_path), "train", 32, name="floatmnist")
    write_npz(tmp_path / "chestmnist.npz", {"train": np.zeros((2, 28, 28), np.uint8)}, {"train": np.zeros((2, 1))})
    with pytest.raises(ValueError, match=r"chestmnist\.npz: train_labels has 1 columns; chestmnist has 14 findings"):
        medmnist(str(tmp_path), "train", 32, name="chestmnist")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"split='valid'; MedMNIST splits are \['train', 'val', 'test'\]"):
        medmnist(str(tmp_path), "valid", 32)
    with pytest.raises(ValueError, match=r"size=32; MedMNIST files exist at \[28, 64, 128, 224\]"):
        medmnist(str(tmp_path), "train", 32, size=32)
    with pytest.raises(ValueError, match="on_error='ignore'"):
        medmnist(str(tmp_path), "train", 32, on_error="ignore")  # type: ignore[arg-type]


def test_out_of_range_labels_raise_or_are_skipped_with_one_warning(tmp_path):
    labels = np.zeros((12, 1), np.uint8)
    labels[[3, 7], 0] = [2, 9]  # PneumoniaMNIST has classes 0 and 1 only
    write_npz(tmp_path / "pneumoniamnist.npz", {"train": np.zeros((12, 28, 28), np.uint8)}, {"train": labels})
    with pytest.raises(ValueError, match=r"2 of 12 rows of train_labels are not a class index 0\.\.1 \(row 3: \[2\]; row 7: \[9\]"):
        medmnist(str(tmp_path), "train", 32)
    with pytest.warns(UserWarning, match=r"skipped .*2 of 12 rows .*row 3: \[2\]; row 7: \[9\]") as record:
        ds = medmnist(str(tmp_path), "train", 32, on_error="skip")
    assert len(record) == 1 and len(ds) == 10 and len(ds.images) == 10


def test_download_without_the_package_says_how_to_get_the_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "medmnist", None)
    with pytest.raises(ImportError, match=r"pip install medmnist.*dermamnist_64\.npz.*zenodo"):
        medmnist(str(tmp_path), "train", 32, True, name="dermamnist", size=64)


def test_preset_data_section_builds_batches(medmnist_dir):
    """configs/pneumoniamnist_cpu.yaml's data section through the registry and the DataModule."""
    import yaml

    from patronus.data.datamodule import PatronusDataModule
    from tests.conftest import REPO

    preset = yaml.safe_load((REPO / "configs" / "pneumoniamnist_cpu.yaml").read_text())
    data, size = preset["data"], preset["model"]["net"]["image_size"]
    dm = PatronusDataModule(**{**data, "root": str(medmnist_dir)}, image_size=size)
    dm.setup("fit")
    assert len(dm.train_set) == 4708 and len(dm.val_set) == min(524, data.get("val_subset") or 524)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[1:] == (preset["model"]["net"]["in_channels"], size, size)
    assert batch["attributes"].shape[1] == 2
