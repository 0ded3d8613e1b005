"""CelebA: the real 10k subset from ../shared/datasets (never copied here) and official-format
fixtures written in tmp_path for splits and every error path."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patronus.data.celeba import celeba
from patronus.data.images import read_image

NAMES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones Male "
    "Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks "
    "Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace "
    "Wearing_Necktie Young"
).split()
SUBSET = dict(image_dir="img_align_celeba_89x109", attr_file="list_attr_celeba_000001-010000.txt", partition_file=None)


# The real subset ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def subset(shared_datasets: Path):
    return celeba(str(shared_datasets / "celeba_subset"), "train", 64, **SUBSET)


def test_subset_counts_match_the_readme(subset):
    assert len(subset) == 10000 and subset.attribute_names == NAMES and subset.classes == []
    counts = {n: int(subset.attributes[:, NAMES.index(n)].sum()) for n in ("Smiling", "Black_Hair", "Blond_Hair", "Male", "Eyeglasses")}
    assert counts == {"Smiling": 4822, "Black_Hair": 2432, "Blond_Hair": 1452, "Male": 4217, "Eyeglasses": 674}
    assert set(subset.attributes.unique().tolist()) == {0.0, 1.0} and bool((subset.labels == -1).all())
    # 000001.jpg: a smiling brown-haired woman (row 1 of the original file)
    first = dict(zip(NAMES, subset.attributes[0].tolist()))
    assert subset.files[0].name == "000001.jpg" and first["Smiling"] == 1 and first["Male"] == 0 and first["Brown_Hair"] == 1


@pytest.mark.parametrize("crop", ["center", "squash"])
def test_subset_images_at_64px(subset, shared_datasets, crop):
    ds = subset if crop == "center" else celeba(str(shared_datasets / "celeba_subset"), "train", 64, crop="squash", **SUBSET)
    item = ds[123]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() < -0.5 and 0.5 < item["image"].max() <= 1
    assert item["attributes"].shape == (40,) and int(item["label"]) == -1


def test_center_crop_is_the_central_square(shared_datasets):
    """At the native width (89 px) the center crop is exactly rows 10..98 of the 89x109 image, not a squash."""
    root = shared_datasets / "celeba_subset"
    center = celeba(str(root), "train", 89, **SUBSET)
    squash = celeba(str(root), "train", 89, crop="squash", **SUBSET)
    full = read_image(root / SUBSET["image_dir"] / "000007.jpg", 3)
    assert full.shape == (3, 109, 89)
    assert torch.allclose(center[6]["image"], full[:, 10:99, :], atol=1e-6)
    assert (center[6]["image"] - squash[6]["image"]).abs().mean() > 0.05


def test_subset_has_only_the_official_train_partition(shared_datasets):
    with pytest.raises(ValueError, match=r"split 'valid' is empty.*official boundaries.*162770"):
        celeba(str(shared_datasets / "celeba_subset"), "valid", 32, **SUBSET)


# Official-format fixtures in tmp_path ----------------------------------------------------------

ROWS = {  # file -> (partition, attributes as ±1: Smiling at index 31, Male at 20)
    "000001.jpg": 0,
    "000002.jpg": 0,
    "000003.jpg": 0,
    "000004.jpg": 1,
    "000005.jpg": 2,
    "000006.jpg": 2,
}


def _values(k: int) -> list[int]:
    """A distinct ±1 pattern per image: attribute j present iff bit (j % 6) of k+1 is set."""
    return [1 if (k + 1) >> (j % 6) & 1 else -1 for j in range(40)]


def _face(path: Path, rgb: bool = True) -> None:
    """A tiny 24x40 'face': red bands on the top and bottom 8 rows (exactly what the center crop cuts),
    grey inside; bands aligned to JPEG's 8x8 blocks and no chroma subsampling, so no colour bleeds."""
    a = np.full((40, 24, 3), 128, np.uint8)
    a[:8], a[-8:] = (255, 0, 0), (255, 0, 0)
    Image.fromarray(a if rgb else a[..., 1]).save(path, quality=95, subsampling=0)


def make_celeba(root: Path, rows: dict[str, int] = ROWS, *, attr_lines: list[str] | None = None, skip_images: tuple[str, ...] = ()) -> Path:
    """The official layout with CRLF text files, as CUHK ships them."""
    (root / "img_align_celeba").mkdir(parents=True)
    for name in rows:
        if name not in skip_images:
            _face(root / "img_align_celeba" / name)
    if attr_lines is None:
        attr_lines = [f"{name} " + " ".join(f"{v:2d}" for v in _values(k)) for k, name in enumerate(rows)]
    text = [str(len(attr_lines)), " ".join(NAMES) + " ", *attr_lines]
    (root / "list_attr_celeba.txt").write_bytes(("\r\n".join(text) + "\r\n").encode())
    (root / "list_eval_partition.txt").write_bytes("".join(f"{n} {p}\r\n" for n, p in rows.items()).encode())
    return root


def test_official_layout_splits(tmp_path):
    root = make_celeba(tmp_path)
    sizes = {s: len(celeba(str(root), s, 16)) for s in ("train", "valid", "test", "all")}
    assert sizes == {"train": 3, "valid": 1, "test": 2, "all": 6}
    test = celeba(str(root), "test", 16)
    assert [f.name for f in test.files] == ["000005.jpg", "000006.jpg"]
    assert test.attributes.tolist() == [[(v + 1) / 2 for v in _values(k)] for k in (4, 5)]  # ±1 -> 1/0


def test_center_crop_removes_the_bands_squash_keeps_them(tmp_path):
    root = make_celeba(tmp_path)
    center, squash = (celeba(str(root), "train", 16, crop=c)[0]["image"] for c in ("center", "squash"))
    red = lambda x: (x[0] - x[1]).abs().amax(dim=1)  # noqa: E731 - per-row redness
    assert red(center).max() < 0.2 and red(squash)[0] > 0.8 and red(squash)[-1] > 0.8


def test_torchvision_layout_is_found(tmp_path):
    make_celeba(tmp_path / "celeba")
    assert len(celeba(str(tmp_path), "all", 16)) == 6


def test_no_partition_file_uses_official_boundaries(tmp_path):
    rows = {"000001.jpg": 0, "162770.jpg": 0, "162771.jpg": 1, "182637.jpg": 1, "182638.jpg": 2}
    root = make_celeba(tmp_path, rows)
    (root / "list_eval_partition.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"list_eval_partition.txt not found.*partition_file=None"):
        celeba(str(root), "train", 16)
    got = {s: [f.name for f in celeba(str(root), s, 16, partition_file=None).files] for s in ("train", "valid", "test")}
    assert got == {"train": ["000001.jpg", "162770.jpg"], "valid": ["162771.jpg", "182637.jpg"], "test": ["182638.jpg"]}


def test_unknown_split_and_crop(tmp_path):
    root = make_celeba(tmp_path)
    with pytest.raises(ValueError, match=r"split 'val' is unknown.*'valid'"):
        celeba(str(root), "val", 16)
    with pytest.raises(ValueError, match=r"crop='fit'"):
        celeba(str(root), "train", 16, crop="fit")


def test_missing_files_name_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"list_attr_celeba.txt and .*img_align_celeba not found; expected the official layout"):
        celeba(str(tmp_path), "train", 16)
    root = make_celeba(tmp_path / "a")
    (root / "list_attr_celeba.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"a/list_attr_celeba.txt not found"):
        celeba(str(root), "train", 16)


def test_wrong_number_of_values_names_file_and_line(tmp_path):
    lines = [f"{n} " + " ".join(map(str, _values(k))) for k, n in enumerate(ROWS)]
    lines[2] = lines[2].rsplit(" ", 1)[0]  # 000003.jpg loses its last value
    root = make_celeba(tmp_path, attr_lines=lines)
    with pytest.raises(ValueError, match=r"list_attr_celeba.txt line 5: 39 values, expected 40"):
        celeba(str(root), "train", 16)


def test_bad_value_names_line_and_attribute(tmp_path):
    lines = [f"{n} " + " ".join(map(str, _values(k))) for k, n in enumerate(ROWS)]
    lines[0] = "000001.jpg 0 " + " ".join(map(str, _values(0)[1:]))
    root = make_celeba(tmp_path, attr_lines=lines)
    with pytest.raises(ValueError, match=r"line 3, attribute '5_o_Clock_Shadow': value '0'; expected 1 or -1"):
        celeba(str(root), "all", 16)


def test_truncated_attribute_file(tmp_path):
    root = make_celeba(tmp_path)
    text = (root / "list_attr_celeba.txt").read_bytes().split(b"\r\n")
    (root / "list_attr_celeba.txt").write_bytes(b"\r\n".join(text[:-3]))
    with pytest.raises(ValueError, match=r"line 1 says 6 rows but the file holds 4"):
        celeba(str(root), "all", 16)


def test_listed_image_missing_names_file_and_line(tmp_path):
    root = make_celeba(tmp_path, skip_images=("000002.jpg",))
    with pytest.raises(FileNotFoundError, match=r"000002.jpg: listed on line 4 of .*list_attr_celeba.txt but the image does not exist"):
        celeba(str(root), "train", 16)
    assert len(celeba(str(root), "test", 16)) == 2  # other splits are unaffected


def test_row_missing_from_partition_file(tmp_path):
    root = make_celeba(tmp_path)
    (root / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 0\n000003.jpg 0\n000004.jpg 1\n000005.jpg 2\n")
    with pytest.raises(ValueError, match=r"line 8: 000006.jpg is not listed in .*list_eval_partition.txt"):
        celeba(str(root), "test", 16)
    (root / "list_eval_partition.txt").write_text("000001.jpg 3\n")
    with pytest.raises(ValueError, match=r"list_eval_partition.txt line 1: '000001.jpg 3'; expected"):
        celeba(str(root), "test", 16)


def test_grayscale_empty_and_truncated_images(tmp_path):
    root = make_celeba(tmp_path)
    _face(root / "img_align_celeba" / "000001.jpg", rgb=False)
    with pytest.raises(ValueError, match=r"000001.jpg: expected 3 channel\(s\) \(RGB\), got mode L \(line 3 of"):
        celeba(str(root), "train", 16)
    (root / "img_align_celeba" / "000001.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"000001.jpg: cannot open image"):
        celeba(str(root), "train", 16)
    _face(root / "img_align_celeba" / "000001.jpg")
    data = (root / "img_align_celeba" / "000002.jpg").read_bytes()
    (root / "img_align_celeba" / "000002.jpg").write_bytes(data[: data.index(b"\xff\xda") + 20])  # cut inside the scan
    ds = celeba(str(root), "train", 16)  # the header is intact: found when decoded, naming the file
    with pytest.raises(ValueError, match=r"000002.jpg: cannot decode image"):
        ds[1]


def test_skip_drops_bad_rows_with_one_warning(tmp_path):
    lines = [f"{n} " + " ".join(map(str, _values(k))) for k, n in enumerate(ROWS)]
    lines[0] = lines[0] + " 1"  # 41 values
    root = make_celeba(tmp_path, attr_lines=lines, skip_images=("000003.jpg",))
    with pytest.warns(UserWarning) as record:
        ds = celeba(str(root), "train", 16, on_error="skip")
    assert len(record) == 1
    msg = str(record[0].message)
    assert "skipped 2 of 6 rows" in msg and "line 3: 41 values" in msg and "000003.jpg: listed on line 5" in msg
    assert [f.name for f in ds.files] == ["000002.jpg"] and ds.attributes.tolist() == [[(v + 1) / 2 for v in _values(1)]]
    with pytest.raises(ValueError, match=r"line 3: 41 values.*\(and 1 more bad row"):
        celeba(str(root), "train", 16)
    with pytest.raises(ValueError, match=r"on_error='ignore'"):
        celeba(str(root), "train", 16, on_error="ignore")


def test_download_false_never_touches_the_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(FileNotFoundError, match="expected the official layout"):
        celeba(str(tmp_path), "train", 16, download=False)
