"""attribute_folder / ffhq: fixtures in tmp_path (PNG/JPEG of mixed sizes, RGBA, grayscale) and every error path."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patronus.data.folders import attribute_folder, ffhq


def _img(path: Path, size: tuple[int, int] = (40, 30), mode: str = "RGB", seed: int = 0) -> Path:
    """A random image of `size` (w, h) in `mode`, saved as PNG or JPEG by its suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bands = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = rng.integers(0, 256, (size[1], size[0], bands), dtype=np.uint8)
    if mode == "RGBA":
        a[..., 3] = 255
    Image.fromarray(a[..., 0] if mode == "L" else a, mode).save(path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """ROOT/{train,valid}/ with nested folders, PNG + JPEG, sizes 40x30, 16x16, 64x48, and an RGBA PNG."""
    _img(tmp_path / "train" / "b" / "2.jpg", (16, 16), seed=1)
    _img(tmp_path / "train" / "a" / "1.png", (40, 30), seed=2)
    _img(tmp_path / "train" / "c.png", (64, 48), "RGBA", seed=3)
    _img(tmp_path / "valid" / "x.png", (20, 20), seed=4)
    return tmp_path


def _csv(path: Path, text: str) -> str:
    path.write_text(text)
    return path.name


def test_images_sorted_resized_and_rgba_read_as_rgb(folder):
    ds = attribute_folder(str(folder), "train", 32)
    assert [f.relative_to(folder).as_posix() for f in ds.files] == ["train/a/1.png", "train/b/2.jpg", "train/c.png"]
    for i in range(3):
        item = ds[i]
        assert item["image"].shape == (3, 32, 32) and -1 <= item["image"].min() and item["image"].max() <= 1
        assert int(item["label"]) == -1 and item["attributes"].shape == (0,)
    assert ds.attribute_names == [] and ds.classes == [] and len(attribute_folder(str(folder), "valid", 8)) == 1


def test_attributes_csv_paths_relative_to_root(folder):
    csv = _csv(folder / "attrs.csv", "image,Smiling,Hat\ntrain/a/1.png,1,-1\n./train/c.png,0,\nvalid/x.png,1,1\n")
    ds = attribute_folder(str(folder), "train", 16, attributes_csv=csv)
    assert ds.attribute_names == ["Smiling", "Hat"]
    a = ds.attributes.tolist()
    assert a[0] == [1.0, 0.0]  # Hat is a -1/1 column: -1 -> 0
    assert all(math.isnan(v) for v in a[1])  # train/b/2.jpg is not in the CSV: unknown
    assert a[2][0] == 0.0 and math.isnan(a[2][1])  # blank -> NaN
    assert attribute_folder(str(folder), "valid", 16, attributes_csv=csv).attributes.tolist() == [[1.0, 1.0]]


def test_class_column_names_are_shared_by_every_split(folder):
    csv = _csv(folder / "c.csv", "image,class\ntrain/a/1.png,dog\ntrain/b/2.jpg,cat\nvalid/x.png,emu\n")
    train = attribute_folder(str(folder), "train", 16, attributes_csv=csv)
    valid = attribute_folder(str(folder), "valid", 16, attributes_csv=csv)
    assert train.classes == valid.classes == ["cat", "dog", "emu"]
    assert train.labels.tolist() == [1, 0, -1] and valid.labels.tolist() == [2]
    assert train.attribute_names == ["cat", "dog", "emu"] and train.attributes[0].tolist() == [0.0, 1.0, 0.0]
    assert bool(train.attributes[2].isnan().all())  # no class known: attributes unknown


def test_integer_label_column_is_the_index(folder):
    csv = _csv(folder / "l.csv", "label,image,Young\n3,train/a/1.png,1\n0,train/c.png,0\n,train/b/2.jpg,1\n")
    ds = attribute_folder(str(folder), "train", 16, attributes_csv=csv)
    assert ds.classes == ["0", "1", "2", "3"] and ds.labels.tolist() == [3, -1, 0]
    assert ds.attribute_names == ["Young"] and ds.attributes.flatten().tolist() == [1.0, 1.0, 0.0]


def test_ffhq_single_folder_is_the_train_split(tmp_path):
    for k in range(3):  # FFHQ's layout: 00000/00000.png ...
        _img(tmp_path / f"{k // 2:05d}" / f"{k:05d}.png", (24, 24), seed=k)
    ds = ffhq(str(tmp_path), "train", 16)
    assert [f.name for f in ds.files] == ["00000.png", "00001.png", "00002.png"] and ds[2]["image"].shape == (3, 16, 16)
    with pytest.raises(FileNotFoundError, match=r"/test: split folder does not exist.*only split 'train'"):
        ffhq(str(tmp_path), "test", 16)
    with pytest.raises(ValueError, match=r"'ffhq' cannot be downloaded"):
        ffhq(str(tmp_path), "train", 16, download=True)


def test_missing_split_folder_when_root_has_splits(folder):
    with pytest.raises(FileNotFoundError, match=r"/test: split folder does not exist.*split folders \['train', 'valid'\]"):
        attribute_folder(str(folder), "test", 16)
    with pytest.raises(FileNotFoundError, match=r"data root .*nowhere does not exist"):
        attribute_folder(str(folder / "nowhere"), "train", 16)
    (folder / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no image files"):
        attribute_folder(str(folder / "empty"), "train", 16)


def test_grayscale_where_rgb_expected_names_the_file(folder):
    _img(folder / "train" / "d.png", (8, 8), "L")
    with pytest.raises(ValueError, match=r"train/d.png: expected 3 channel\(s\) \(RGB\), got mode L"):
        attribute_folder(str(folder), "train", 16)
    with pytest.warns(UserWarning, match=r"skipped 1 of 4 CSV rows and image files.*d.png"):
        ds = attribute_folder(str(folder), "train", 16, on_error="skip")
    assert len(ds) == 3


def test_one_channel_folder(tmp_path):
    _img(tmp_path / "train" / "g.png", (10, 12), "L")
    _img(tmp_path / "train" / "rgb.png", (10, 12), "RGB")
    ds = attribute_folder(str(tmp_path), "train", 8, channels=1)
    assert ds[0]["image"].shape == (1, 8, 8)
    with pytest.raises(ValueError, match=r"rgb.png: expected 1 channel\(s\) \(L\), got 3"):  # colour: found when decoded
        ds[1]


def test_csv_row_naming_a_missing_file(folder):
    csv = _csv(folder / "a.csv", "image,Smiling\ntrain/a/1.png,1\na/1.png,0\nvalid/nope.png,1\n")
    expected = (
        r"a.csv: row on line 3 \(image='a/1.png'\): .*a/1.png does not exist; paths are relative to ROOT, did you mean train/a/1.png\?"
    )
    with pytest.raises(FileNotFoundError, match=expected + r".*and 1 more"):
        attribute_folder(str(folder), "train", 16, attributes_csv=csv)
    with pytest.warns(UserWarning) as record:
        ds = attribute_folder(str(folder), "train", 16, attributes_csv=csv, on_error="skip")
    assert len(record) == 1 and "skipped 2 of 6" in str(record[0].message) and "valid/nope.png" in str(record[0].message)
    assert ds.attributes.flatten().tolist()[0] == 1.0


def test_csv_structure_errors(folder):
    with pytest.raises(FileNotFoundError, match=r"attributes_csv .*missing.csv does not exist"):
        attribute_folder(str(folder), "train", 16, attributes_csv="missing.csv")
    csv = _csv(folder / "b.csv", "file,Smiling\ntrain/a/1.png,1\n")
    with pytest.raises(ValueError, match=r"b.csv: no column 'image' \(path_column\).*\['file', 'Smiling'\]"):
        attribute_folder(str(folder), "train", 16, attributes_csv=csv)
    assert len(attribute_folder(str(folder), "train", 16, attributes_csv=csv, path_column="file")) == 3
    csv = _csv(folder / "c.csv", "image,label,class\n")
    with pytest.raises(ValueError, match=r"both 'label' and 'class'"):
        attribute_folder(str(folder), "train", 16, attributes_csv=csv)


def test_csv_value_errors(folder):
    csv = _csv(folder / "v.csv", "image,Smiling\ntrain/a/1.png,yes\n")
    with pytest.raises(ValueError, match=r"v.csv: row on line 2, column 'Smiling': value 'yes'; expected 1, 0, -1 or blank"):
        attribute_folder(str(folder), "train", 16, attributes_csv=csv)
    csv = _csv(folder / "w.csv", "image,Smiling\ntrain/a/1.png,0.5\n")
    with pytest.raises(ValueError, match=r"value '0.5'"):
        attribute_folder(str(folder), "train", 16, attributes_csv=csv)
    csv = _csv(folder / "d.csv", "image,Smiling\ntrain/a/1.png,1\ntrain/a/1.png,0\n")
    with pytest.raises(ValueError, match=r"row on line 3: 'train/a/1.png' already listed on line 2"):
        attribute_folder(str(folder), "train", 16, attributes_csv=csv)
    csv = _csv(folder / "s.csv", "image,Smiling\ntrain/a/1.png\n")
    with pytest.raises(ValueError, match=r"row on line 2: 1 cells, expected 2"):
        attribute_folder(str(folder), "train", 16, attributes_csv=csv)
    csv = _csv(folder / "u.csv", "image,Effusion\ntrain/a/1.png,1\ntrain/b/2.jpg,0\ntrain/c.png,-1\n")
    with pytest.raises(ValueError, match=r"column 'Effusion': holds -1, 0 and 1.*ambiguous"):
        attribute_folder(str(folder), "train", 16, attributes_csv=csv)
    csv = _csv(folder / "n.csv", "image,label\ntrain/a/1.png,-2\n")
    with pytest.raises(ValueError, match=r"column 'label': class -2; expected an index >= 0"):
        attribute_folder(str(folder), "train", 16, attributes_csv=csv)


def test_options_and_download_are_checked(folder):
    with pytest.raises(ValueError, match=r"'attribute_folder' cannot be downloaded"):
        attribute_folder(str(folder), "train", 16, download=True)
    with pytest.raises(ValueError, match=r"on_error='warn'"):
        attribute_folder(str(folder), "train", 16, on_error="warn")


def test_corrupt_image_found_up_front_or_when_decoded(folder):
    (folder / "train" / "a" / "1.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"train/a/1.png: cannot open image"):
        attribute_folder(str(folder), "train", 16)
    _img(folder / "train" / "a" / "1.png")
    data = (folder / "train" / "a" / "1.png").read_bytes()
    (folder / "train" / "a" / "1.png").write_bytes(data[: len(data) // 2])  # header intact, pixels cut
    ds = attribute_folder(str(folder), "train", 16)
    with pytest.raises(ValueError, match=r"1.png: cannot decode image"):
        ds[0]
    assert torch.isfinite(ds[1]["image"]).all()
