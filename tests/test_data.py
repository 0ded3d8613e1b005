"""Loaders on real files, and clear errors for bad input."""

import gzip
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from patronus.data import PatronusDataModule, build_dataset, read_image
from tests.conftest import REPO


def test_embedded_mnist_subset_is_real_mnist():
    ds = build_dataset("mnist", str(REPO / "data"), "train", 32)
    assert len(ds) == 12000
    item = ds[0]
    assert item["image"].shape == (1, 32, 32)
    assert item["image"].min() == -1 and item["image"].max() > 0.9
    assert int(item["label"]) == 5  # MNIST's first training digit
    assert item["attributes"].argmax() == 5 and ds.attribute_names[5] == "5"


def test_embedded_subset_matches_the_original_files(shared_datasets):
    full = build_dataset("mnist", str(shared_datasets), "test", 28)
    sub = build_dataset("mnist", str(REPO / "data"), "test", 28)
    assert len(full) == 10000
    assert torch.equal(full.images[: len(sub)], sub.images) and torch.equal(full.labels[: len(sub)], sub.labels)


def test_fashion_mnist_from_torchvision_layout(shared_datasets):
    ds = build_dataset("fashion_mnist", str(shared_datasets), "test", 32)
    assert len(ds) == 10000 and torch.bincount(ds.labels).tolist() == [1000] * 10
    assert ds.attribute_names[9] == "Ankle boot"


def test_image_folder_on_real_chest_xrays(shared_datasets):
    ds = build_dataset("image_folder", str(shared_datasets / "nih_cxr1000_64px"), "valid", 32, channels=1)
    assert len(ds) == 200 and ds.classes == ["0_normal", "1_abnormal"]
    item = ds[150]
    assert item["image"].shape == (1, 32, 32) and int(item["label"]) == 1  # RGBA/RGB grey files read as 1 channel


def test_datamodule_batches(tmp_path):
    dm = PatronusDataModule(root=str(REPO / "data"), batch_size=16, train_subset=64, val_subset=32)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (16, 1, 32, 32) and batch["label"].shape == (16,)
    assert len(dm.val_set) == 32


def test_missing_data_directory_says_what_layout_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no MNIST/raw/ folder.*download=true"):
        build_dataset("mnist", str(tmp_path), "train", 32)


def test_truncated_idx_file_is_reported(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (REPO / "data" / "MNIST" / "raw").iterdir():
        shutil.copy(f, raw / f.name)
    data = gzip.open(raw / "t10k-images-idx3-ubyte.gz").read()
    with gzip.open(raw / "t10k-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: header says"):
        build_dataset("mnist", str(tmp_path), "test", 32)


def test_unknown_dataset_lists_the_registry():
    with pytest.raises(ValueError, match=r"data.dataset='cifar11'.*mnist"):
        build_dataset("cifar11", "data", "train", 32)


def _png(path, array, mode):
    Image.fromarray(array, mode).save(path)
    return path


def test_read_image_errors_name_the_file(tmp_path):
    rgb = _png(tmp_path / "rgb.png", np.random.randint(0, 255, (32, 32, 3), np.uint8), "RGB")
    with pytest.raises(ValueError, match=r"rgb.png: expected 1 channel"):
        read_image(rgb, channels=1, size=32)
    small = _png(tmp_path / "small.png", np.zeros((28, 28), np.uint8), "L")
    with pytest.raises(ValueError, match=r"small.png: expected a 32x32 image, got 28x28"):
        read_image(small, channels=1, size=32)
    assert read_image(small, channels=1, resize_to=32).shape == (1, 32, 32)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match=r"corrupt.png: cannot decode image"):
        read_image(corrupt, channels=1)
    full = _png(tmp_path / "full.png", np.random.randint(0, 255, (64, 64), np.uint8), "L").read_bytes()
    (tmp_path / "truncated.png").write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match=r"truncated.png: cannot decode image"):
        read_image(tmp_path / "truncated.png", channels=1)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png", channels=1)


def test_grey_rgb_file_counts_as_one_channel(tmp_path):
    grey = np.random.randint(0, 255, (32, 32), np.uint8)
    path = _png(tmp_path / "g.png", np.stack([grey] * 3, -1), "RGB")
    x = read_image(path, channels=1, size=32)
    assert x.shape == (1, 32, 32)
    assert torch.allclose(x[0], torch.from_numpy(grey).float() / 127.5 - 1)


def test_unknown_dataset_option_is_named():
    with pytest.raises(ValueError, match=r"data.options \['crop'\] not understood by dataset 'mnist'"):
        build_dataset("mnist", str(REPO / "data"), "test", 32, crop="centre")


def test_holdout_splits_train_without_overlap():
    dm = PatronusDataModule(root=str(REPO / "data"), holdout=0.1, val_subset=None, train_subset=None)
    dm.setup("fit")
    train, val = set(dm.train_set.indices.tolist()), set(dm.val_set.indices.tolist())
    assert len(val) == 1200 and len(train) == 10800 and not train & val
    again = PatronusDataModule(root=str(REPO / "data"), holdout=0.1, val_subset=None)
    again.setup("fit")
    assert again.val_set.indices.tolist() == dm.val_set.indices.tolist()  # fixed choice
    with pytest.raises(ValueError, match="data.holdout=1.5"):
        PatronusDataModule(root=str(REPO / "data"), holdout=1.5).setup("fit")
