"""CIFAR-10: the real JPEG test split from ../shared/datasets (never copied here), torchvision's
python-batch layout (its glue via a stand-in, its errors for real) and the folder-layout errors."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from patronus.data.cifar import CLASSES, cifar10


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# The real JPEG test split ------------------------------------------------------------------


@pytest.fixture(scope="module")
def jpeg_test(shared_datasets: Path):
    return cifar10(str(shared_datasets / "cifar10_jpeg"), "test", 32)  # layout auto -> folders


def test_real_jpeg_test_split(jpeg_test):
    assert len(jpeg_test) == 10000 and jpeg_test.classes == CLASSES == sorted(CLASSES)
    assert torch.bincount(jpeg_test.labels).tolist() == [1000] * 10
    assert jpeg_test.attribute_names == CLASSES and torch.equal(jpeg_test.attributes.argmax(1), jpeg_test.labels)
    assert jpeg_test.attributes.sum(1).eq(1).all()
    item = jpeg_test[3500]  # test/cat/0500.jpg: files sorted by class then number
    assert jpeg_test.files[3500].parts[-2:] == ("cat", "0500.jpg") and int(item["label"]) == 3
    assert item["image"].shape == (3, 32, 32) and -1 <= item["image"].min() < 0 < item["image"].max() <= 1


def test_real_jpeg_resized(shared_datasets):
    ds = cifar10(str(shared_datasets / "cifar10_jpeg"), "test", 64, layout="folders")
    assert ds[0]["image"].shape == (3, 64, 64)


def test_shared_copy_has_no_train_split(shared_datasets):
    with pytest.raises(FileNotFoundError, match=r"neither .*cifar-10-batches-py .*nor .*cifar10_jpeg/train"):
        cifar10(str(shared_datasets / "cifar10_jpeg"), "train", 32)
    with pytest.raises(FileNotFoundError, match=r"cifar10_jpeg/train not found.*ROOT holds folders \['test'\]"):
        cifar10(str(shared_datasets / "cifar10_jpeg"), "train", 32, layout="folders")


# torchvision's python batches ------------------------------------------------------------------


def test_missing_batches_folder_is_a_clear_error_without_network(tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match=r"neither .*cifar-10-batches-py \(torchvision's python batches\) nor .*/train"):
        cifar10(str(tmp_path), "train", 32)
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py not found; expected torchvision's layout.*download=true"):
        cifar10(str(tmp_path), "test", 32, layout="python")


def test_incomplete_batches_folder_is_reported_without_network(tmp_path, no_network):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not the real batch")
    with pytest.raises(RuntimeError, match=r"cifar-10-batches-py: torchvision could not read the CIFAR-10 batches"):
        cifar10(str(tmp_path), "test", 32)


class FakeCIFAR10:
    """Stands in for torchvision.datasets.CIFAR10 (whose real batches are not staged): same attributes."""

    calls: list[dict] = []

    def __init__(self, root: str, train: bool = True, download: bool = False):
        FakeCIFAR10.calls.append(dict(root=root, train=train, download=download))
        n = 6 if train else 4
        self.data = np.zeros((n, 32, 32, 3), np.uint8)
        self.data[:, :, :, 0] = 255  # red images, stored HWC like the real batches
        self.targets = [i % 10 for i in range(n)]


def test_python_layout_uses_torchvisions_loader(tmp_path, monkeypatch):
    (tmp_path / "cifar-10-batches-py").mkdir()
    FakeCIFAR10.calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    train = cifar10(str(tmp_path), "train", 32)
    test = cifar10(str(tmp_path), "test", 16, layout="python")
    assert FakeCIFAR10.calls == [
        dict(root=str(tmp_path), train=True, download=False),
        dict(root=str(tmp_path), train=False, download=False),
    ]
    assert len(train) == 6 and len(test) == 4 and train.labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert train.images.dtype == torch.uint8 and train.attributes[5].argmax() == 5 and train.classes == CLASSES
    x = test[0]["image"]
    assert x.shape == (3, 16, 16) and torch.allclose(x[0], torch.ones(16, 16)) and torch.allclose(x[1:], -torch.ones(2, 16, 16))
    with pytest.raises(ValueError, match=r"split 'valid' is unknown for the python batches"):
        cifar10(str(tmp_path), "valid", 32)


# Folder layout errors --------------------------------------------------------------------------


def _jpg(path: Path, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (32, 32), 90 if mode == "L" else (200, 30, 30)).save(path)


def test_folder_layout_errors(tmp_path):
    _jpg(tmp_path / "test" / "cat" / "0000.jpg")
    _jpg(tmp_path / "test" / "truck" / "0000.jpg")
    ds = cifar10(str(tmp_path), "test", 32)
    assert ds.labels.tolist() == [3, 9] and ds.attributes.shape == (2, 10)
    _jpg(tmp_path / "test" / "kitten" / "0000.jpg")
    with pytest.raises(ValueError, match=r"class folder\(s\) \['kitten'\] are not CIFAR-10 classes"):
        cifar10(str(tmp_path), "test", 32)
    (tmp_path / "test" / "kitten" / "0000.jpg").unlink()
    _jpg(tmp_path / "test" / "0001.jpg")
    with pytest.raises(ValueError, match=r"test/0001.jpg: image directly in .*expected it in a class folder"):
        cifar10(str(tmp_path), "test", 32)
    (tmp_path / "test" / "0001.jpg").unlink()
    _jpg(tmp_path / "test" / "dog" / "0000.jpg", mode="L")
    with pytest.raises(ValueError, match=r"dog/0000.jpg: expected 3 channel\(s\) \(RGB\), got mode L"):
        cifar10(str(tmp_path), "test", 32)
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 image files.*dog/0000.jpg"):
        assert len(cifar10(str(tmp_path), "test", 32, on_error="skip")) == 2


def test_bad_options(tmp_path):
    _jpg(tmp_path / "test" / "cat" / "0000.jpg")
    with pytest.raises(ValueError, match=r"layout='pickle'"):
        cifar10(str(tmp_path), "test", 32, layout="pickle")
    with pytest.raises(ValueError, match=r"layout='folders' cannot be downloaded"):
        cifar10(str(tmp_path), "test", 32, layout="folders", download=True)
