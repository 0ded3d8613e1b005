"""CheXpert loader on a tiny fixture in the official CheXpert-v1.0-small format (CheXpert may not be
redistributed and is not staged): view filter, uncertainty policies, pacemaker labels, every error path."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from patronus.data.chexpert import FINDINGS, chexpert

HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *FINDINGS]
COL = {name: i for i, name in enumerate(HEADER)}


def row(path: str, view: str = "Frontal", **labels: str) -> list[str]:
    """One CSV row like the official ones; `labels` by column name with spaces as underscores."""
    cells = [path, "Female", "68", view, "AP" if view == "Frontal" else ""] + [""] * len(FINDINGS)
    for key, value in labels.items():
        cells[COL[key.replace("_", " ")]] = value
    return cells


def write_csv(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    return path


def jpeg(root: Path, rel: str, value: int, size: tuple[int, int] = (40, 48)) -> None:
    """A grayscale JPEG (non-square, as CheXpert's are) of constant `value`."""
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint8), "L").save(root / rel, quality=95)


TRAIN = "CheXpert-v1.0-small/train"
ROWS = [  # patient 1: frontal + lateral; 2: uncertain edema; 3: blank cells only; 4: pacemaker
    row(f"{TRAIN}/patient00001/study1/view1_frontal.jpg", No_Finding="1.0", Support_Devices="0.0"),
    row(f"{TRAIN}/patient00001/study1/view2_lateral.jpg", "Lateral", No_Finding="1.0"),
    row(f"{TRAIN}/patient00002/study1/view1_frontal.jpg", Edema="-1.0", Cardiomegaly="1.0", Support_Devices="1.0"),
    row(f"{TRAIN}/patient00003/study1/view1_frontal.jpg"),
    row(f"{TRAIN}/patient00004/study2/view1_frontal.jpg", Support_Devices="1.0", Pleural_Effusion="-1.0"),
]
VALUES = [255, 128, 0, 64, 200]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """ROOT holding CheXpert-v1.0-small/{train,valid}.csv and the JPEGs they list."""
    for r, v in zip(ROWS, VALUES):
        jpeg(tmp_path, r[0], v)
    write_csv(tmp_path / "CheXpert-v1.0-small" / "train.csv", ROWS)
    valid = [row("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", Lung_Opacity="1.0")]
    jpeg(tmp_path, valid[0][0], 10)
    write_csv(tmp_path / "CheXpert-v1.0-small" / "valid.csv", valid)
    return tmp_path


def column(ds, name: str) -> list[float]:
    return ds.attributes[:, ds.attribute_names.index(name)].tolist()


def test_frontal_view_table_and_images(root):
    ds = chexpert(str(root), "train", 32)
    assert len(ds) == 4 and not any(f.endswith("view2_lateral.jpg") for f in ds.files)
    assert ds.attribute_names == FINDINGS and ds.classes == [] and (ds.labels == -1).all()
    assert ds.shortcut_attributes == ["Support Devices"]
    assert column(ds, "Support Devices") == [0, 1, 0, 1] and column(ds, "No Finding") == [1, 0, 0, 0]
    assert ds.attributes[2].tolist() == [0.0] * 14  # blank everywhere -> 0 (not mentioned)
    assert ds.csv_lines == [2, 4, 5, 6]
    item = ds[0]
    assert item["image"].shape == (1, 32, 32) and item["label"] == -1 and item["attributes"].shape == (14,)
    assert item["image"].max() <= 1 and item["image"].min() >= 0.99  # the all-white JPEG
    assert abs(ds[2]["image"].mean() - (64 / 127.5 - 1)) < 0.02
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["attributes"].shape == (4, 14)


def test_view_filter(root):
    lateral = chexpert(str(root), "train", 16, view="lateral")
    assert [Path(f).name for f in lateral.files] == ["view2_lateral.jpg"]
    assert len(chexpert(str(root), "train", 16, view="all")) == 5


@pytest.mark.parametrize("policy,edema", [("ones", 1.0), ("zeros", 0.0), ("ignore", math.nan)])
def test_uncertainty_policies(root, policy, edema):
    ds = chexpert(str(root), "train", 16, uncertainty=policy)
    got = column(ds, "Edema")
    assert got[0] == got[2] == got[3] == 0.0  # blank is "not mentioned" under every policy
    assert got[1] == edema or (math.isnan(edema) and math.isnan(got[1]))
    assert column(ds, "Cardiomegaly")[1] == 1.0


def test_valid_split(root):
    ds = chexpert(str(root), "valid", 16)
    assert len(ds) == 1 and column(ds, "Lung Opacity") == [1.0]


@pytest.mark.parametrize("header", [True, False])
def test_pacemaker_column_from_csv(root, tmp_path, header):
    pm_rows = [
        [f"{TRAIN}/patient00004/study2/view1_frontal.jpg", "1"],
        [f"{TRAIN}/patient00002/study1/view1_frontal.jpg", "0"],
        # the same image named as in the full-resolution release still matches
        ["CheXpert-v1.0/train/patient00003/study1/view1_frontal.jpg", "0.0"],
        [f"{TRAIN}/patient99999/study1/view1_frontal.jpg", "1"],
    ]  # not in this split: unused
    pm_csv = tmp_path / "pacemaker.csv"
    pm_csv.write_text("\n".join(",".join(r) for r in ([["Path", "PM"]] if header else []) + pm_rows) + "\n")
    ds = chexpert(str(root), "train", 16, pacemaker_csv=str(pm_csv))
    assert ds.attribute_names == [*FINDINGS, "Pacemaker"] and ds.attributes.shape == (4, 15)
    assert ds.shortcut_attributes == ["Support Devices", "Pacemaker"]
    pm = column(ds, "Pacemaker")
    assert math.isnan(pm[0]) and pm[1:] == [0.0, 0.0, 1.0]  # patient 1 is not listed: unknown


def test_pacemaker_csv_matching_nothing_warns(root, tmp_path):
    pm_csv = write_csv(tmp_path / "pm.csv", [["elsewhere/x.jpg", "1"]], header=["image", "PM"])
    with pytest.warns(UserWarning, match="none of its 1 paths matches"):
        ds = chexpert(str(root), "train", 16, pacemaker_csv=str(pm_csv))
    assert ds.attributes[:, -1].isnan().all()


# -- errors ------------------------------------------------------------------------------------


def test_missing_csv_names_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CheXpert-v1.0-small/train\.csv not found: expected the official layout"):
        chexpert(str(tmp_path), "train", 32)


def test_csv_missing_a_column(root):
    csv = root / "CheXpert-v1.0-small" / "train.csv"
    write_csv(csv, [r[:-1] for r in ROWS], header=HEADER[:-1])
    with pytest.raises(ValueError, match=r"train\.csv: missing column\(s\) \['Support Devices'\]"):
        chexpert(str(root), "train", 32)


def test_path_that_does_not_exist(root):
    (root / ROWS[2][0]).unlink()
    with pytest.raises(FileNotFoundError, match=r"train\.csv line 4: image '.*patient00002/study1/view1_frontal\.jpg' does not exist"):
        chexpert(str(root), "train", 32)


def test_bad_label_value(root):
    rows = [list(r) for r in ROWS]
    rows[3][COL["Fracture"]] = "2.0"
    write_csv(root / "CheXpert-v1.0-small" / "train.csv", rows)
    with pytest.raises(ValueError, match=r"train\.csv line 5: column 'Fracture' has '2.0', expected 1\.0, 0\.0, -1\.0 or blank"):
        chexpert(str(root), "train", 32)


def test_bad_view_value_and_short_row(root):
    rows = [list(r) for r in ROWS]
    rows[0][COL["Frontal/Lateral"]] = "PA"
    write_csv(root / "CheXpert-v1.0-small" / "train.csv", rows)
    with pytest.raises(ValueError, match=r"line 2: column 'Frontal/Lateral' has 'PA', expected 'Frontal' or 'Lateral'"):
        chexpert(str(root), "train", 32)
    write_csv(root / "CheXpert-v1.0-small" / "train.csv", [ROWS[0][:5]])
    with pytest.raises(ValueError, match=r"line 2: 5 fields, the header has 19"):
        chexpert(str(root), "train", 32)


def test_skip_drops_bad_rows_with_one_warning(root):
    (root / ROWS[2][0]).unlink()
    rows = [list(r) for r in ROWS]
    rows[3][COL["Edema"]] = "maybe"
    write_csv(root / "CheXpert-v1.0-small" / "train.csv", rows)
    with pytest.warns(UserWarning) as record:
        ds = chexpert(str(root), "train", 32, on_error="skip")
    assert len(record) == 1
    message = str(record[0].message)
    assert "skipped 2 of 5 rows" in message and "line 4: image" in message and "line 5: column 'Edema' has 'maybe'" in message
    assert [r for r in ds.csv_lines] == [2, 6] and ds[1]["image"].shape == (1, 32, 32)


def test_corrupt_or_colour_image_names_file_and_csv_line(root):
    ds = chexpert(str(root), "train", 32)
    good = (root / ROWS[3][0]).read_bytes()
    (root / ROWS[3][0]).write_bytes(good[:100])  # truncated after the dataset was built: found when decoded
    with pytest.raises(ValueError, match=r"patient00003/study1/view1_frontal\.jpg: cannot decode image.*train\.csv line 5"):
        ds[2]
    with pytest.raises(ValueError, match=r"patient00003/study1/view1_frontal\.jpg: cannot open image.*train\.csv line 5"):
        chexpert(str(root), "train", 32)  # and up front when it is built
    (root / ROWS[3][0]).write_bytes(good)
    rgb = np.zeros((48, 40, 3), np.uint8)
    rgb[..., 0] = 255  # red: really colour, not a grey image stored as RGB
    Image.fromarray(rgb, "RGB").save(root / ROWS[0][0])
    with pytest.raises(ValueError, match=r"view1_frontal\.jpg: expected 1 channel\(s\) \(L\), got 3"):
        ds[0]


def test_bad_pacemaker_csv(root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pacemaker_csv .*nope\.csv does not exist"):
        chexpert(str(root), "train", 16, pacemaker_csv=str(tmp_path / "nope.csv"))
    no_pm = write_csv(tmp_path / "no_pm.csv", [[ROWS[0][0], "1"]], header=["Path", "Device"])
    with pytest.raises(ValueError, match=r"no_pm\.csv: line 1 is \['Path', 'Device'\]; expected a header with a PM column"):
        chexpert(str(root), "train", 16, pacemaker_csv=str(no_pm))
    bad = write_csv(tmp_path / "bad.csv", [[ROWS[0][0], "yes"], [ROWS[2][0], "1"]], header=["Path", "PM"])
    with pytest.raises(ValueError, match=r"bad\.csv line 2: column PM has 'yes', expected 0 or 1"):
        chexpert(str(root), "train", 16, pacemaker_csv=str(bad))
    with pytest.warns(UserWarning, match=r"ignored 1 rows of pacemaker_csv .*bad\.csv line 2") as record:
        ds = chexpert(str(root), "train", 16, pacemaker_csv=str(bad), on_error="skip")
    assert len(record) == 1 and math.isnan(column(ds, "Pacemaker")[0]) and column(ds, "Pacemaker")[1] == 1.0


def test_bad_arguments(root):
    with pytest.raises(ValueError, match=r"split='test'; CheXpert-v1.0-small splits are \['train', 'valid'\]"):
        chexpert(str(root), "test", 32)
    with pytest.raises(ValueError, match=r"uncertainty='half'; expected one of \['ones', 'zeros', 'ignore'\]"):
        chexpert(str(root), "train", 32, uncertainty="half")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"view='side'"):
        chexpert(str(root), "train", 32, view="side")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot be downloaded automatically"):
        chexpert(str(root), "train", 32, True)


def test_conflicting_pacemaker_rows(root, tmp_path):
    pm_csv = write_csv(tmp_path / "pm.csv", [[ROWS[0][0], "1"], [ROWS[0][0], "0"]], header=["Path", "PM"])
    with pytest.raises(ValueError, match=r"pm\.csv line 3: .*view1_frontal\.jpg listed again with a different PM"):
        chexpert(str(root), "train", 16, pacemaker_csv=str(pm_csv))
    with pytest.warns(UserWarning, match="ignored 1 rows"):
        ds = chexpert(str(root), "train", 16, pacemaker_csv=str(pm_csv), on_error="skip")
    assert math.isnan(column(ds, "Pacemaker")[0])  # conflicting -> unknown, never a guess


def test_preset_data_section_builds_batches(root):
    """configs/chexpert_cpu.yaml's data section through the registry and the DataModule."""
    import yaml

    from patronus.data.datamodule import PatronusDataModule
    from tests.conftest import REPO

    preset = yaml.safe_load((REPO / "configs" / "chexpert_cpu.yaml").read_text())
    data = {**preset["data"], "root": str(root), "batch_size": 2}
    dm = PatronusDataModule(**data, image_size=preset["model"]["net"]["image_size"])
    dm.setup("fit")
    assert len(dm.train_set) == 4 and len(dm.val_set) == 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 64, 64) and batch["attributes"].shape == (2, 14)


def test_dicom_derived_16_bit_pngs_with_bit_depth_and_invert(tmp_path):
    """A re-export from DICOM: 12-bit values in 16-bit PNGs without sBIT, MONOCHROME1 (inverted)."""
    rel = f"{TRAIN}/patient00001/study1/view1_frontal.png"
    (tmp_path / rel).parent.mkdir(parents=True)
    Image.fromarray(np.linspace(0, 4095, 16).round().reshape(4, 4).astype(np.uint16)).save(tmp_path / rel)
    csv_path = write_csv(tmp_path / "CheXpert-v1.0-small" / "train.csv", [row(rel)])
    with pytest.warns(UserWarning, match=f"CheXpert train \\({csv_path}\\): .*set bit_depth: 12"):
        chexpert(str(tmp_path), "train", 4)
    x = chexpert(str(tmp_path), "train", 4, bit_depth=12)[0]["image"]
    assert float(x.min()) == pytest.approx(-1) and float(x.max()) == pytest.approx(1)
    flipped = chexpert(str(tmp_path), "train", 4, bit_depth=12, invert=True)[0]["image"]
    assert float(flipped[0, 0, 0]) == pytest.approx(1) and float(flipped[0, -1, -1]) == pytest.approx(-1)
    with pytest.raises(ValueError, match=r"view1_frontal\.png: pixel value 4095 is above 1023,.*line 2"):
        chexpert(str(tmp_path), "train", 4, bit_depth=10, verify="decode")
