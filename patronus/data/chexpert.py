"""CheXpert (`CheXpert-v1.0-small` layout) -> multi-label chest X-ray dataset with shortcut attributes.

Layout (as Stanford distributes it): `ROOT/CheXpert-v1.0-small/{train,valid}.csv` and the JPEGs
they list; a CSV `Path` such as `CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`
is relative to ROOT. Label cells are 1.0 (positive), 0.0 (negative), -1.0 (uncertain) or blank
(not mentioned, read as 0). The whole label table is parsed at construction (no image decoded),
so shortcut builders can select rows; images are decoded lazily.
"""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path
from typing import Literal, Optional

import torch

from patronus.data.checks import image_problem, warn_if_few_bits_used
from patronus.data.datasets import LabelledImageDataset
from patronus.data.images import AS_STORED, Intensity, read_image

FOLDER = "CheXpert-v1.0-small"
CSV_FILES = {"train": "train.csv", "valid": "valid.csv"}
FINDINGS = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]
VIEW_COLUMN = "Frontal/Lateral"
SHORTCUTS = ("Support Devices", "Pacemaker")  # devices a classifier can use instead of the anatomy
UNCERTAIN = {"ones": 1.0, "zeros": 0.0, "ignore": float("nan")}
PM_VALUES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0}
SHOWN = 5  # offenders quoted in an error or a skip warning


def _label(value: str, policy: float) -> Optional[float]:
    """One label cell -> 1/0/NaN; None when it is not a CheXpert label value."""
    v = value.strip()
    if not v:
        return 0.0  # blank = not mentioned in the report
    try:
        f = float(v)
    except ValueError:
        return None
    return {1.0: 1.0, 0.0: 0.0, -1.0: policy}.get(f)


def path_key(path: str) -> str:
    """Image path for matching across files: `/` separators, and the dataset folder
    (`CheXpert-v1.0-small/`, or `CheXpert-v1.0/` of the full-resolution release) dropped."""
    parts = [p for p in path.strip().replace("\\", "/").split("/") if p not in ("", ".")]
    if parts and parts[0].lower().startswith("chexpert-v1.0"):
        parts = parts[1:]
    return "/".join(parts)


def read_pacemaker_csv(path: Path, problems: list[str]) -> dict[str, float]:
    """Pacemaker labels {path_key: 0/1} from a CSV of `image path, PM` rows, with a header
    (e.g. `Path,PM`; the path column is `Path` or else the first non-PM column) or without one.
    Bad rows are appended to `problems` (the caller raises or warns)."""
    if not path.is_file():
        raise FileNotFoundError(f"pacemaker_csv {path} does not exist; expected a CSV of image path, PM (0/1) rows")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    rows = [(i + 1, r) for i, r in enumerate(rows) if any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path}: empty; expected a CSV of image path, PM (0/1) rows")
    first = [c.strip().lower() for c in rows[0][1]]
    if "pm" in first:  # header row
        pm_col = first.index("pm")
        others = [i for i in range(len(first)) if i != pm_col]
        if not others:
            raise ValueError(f"{path}: header {rows[0][1]} has a PM column but no image path column")
        path_col = first.index("path") if "path" in first else others[0]
        rows = rows[1:]
    elif len(first) >= 2 and first[1] in PM_VALUES:  # headerless `path,PM` rows
        path_col, pm_col = 0, 1
    else:
        raise ValueError(
            f"{path}: line 1 is {rows[0][1]}; expected a header with a PM column (e.g. Path,PM) or headerless rows `image path,0|1`"
        )
    labels: dict[str, float] = {}
    for line, row in rows:
        if len(row) <= max(path_col, pm_col) or not row[path_col].strip():
            problems.append(f"{path} line {line}: expected an image path and a PM value, got {row}")
            continue
        value = row[pm_col].strip()
        pm = PM_VALUES.get(value)
        key = path_key(row[path_col])
        if pm is None:
            problems.append(f"{path} line {line}: column PM has {value!r}, expected 0 or 1")
        elif labels.get(key, pm) != pm:
            problems.append(f"{path} line {line}: {row[path_col].strip()} listed again with a different PM ({value})")
            labels[key] = float("nan")  # conflicting: unknown
        else:
            labels[key] = pm
    return labels


class CheXpertDataset(LabelledImageDataset):
    """CheXpert rows that passed the checks: image files, 14 findings (+ Pacemaker), no class labels.

    `shortcut_attributes` names the device attributes present (Support Devices, Pacemaker):
    the confounders a shortcut analysis looks for. `csv_lines` maps each row to its CSV line.
    """

    def __init__(
        self,
        csv_path: Path,
        files: list[str],
        csv_lines: list[int],
        attributes: torch.Tensor,
        attribute_names: list[str],
        image_size: int,
        intensity: Intensity = AS_STORED,
    ):
        self.csv_path, self.files, self.csv_lines, self.image_size = csv_path, files, csv_lines, image_size
        self.intensity = intensity
        self.attributes, self.attribute_names, self.classes = attributes, attribute_names, []
        self.labels = torch.full((len(files),), -1, dtype=torch.long)
        self.shortcut_attributes = [a for a in SHORTCUTS if a in attribute_names]

    def load_image(self, i: int) -> torch.Tensor:
        try:
            return read_image(self.files[i], 1, resize_to=self.image_size, intensity=self.intensity)
        except (OSError, ValueError) as e:  # add where the file came from; read_image already names the file
            raise type(e)(f"{e} (listed in {self.csv_path} line {self.csv_lines[i]})") from e


def chexpert(
    root: str,
    split: str,
    image_size: int,
    download: bool = False,
    *,
    view: Literal["frontal", "lateral", "all"] = "frontal",
    uncertainty: Literal["ones", "zeros", "ignore"] = "zeros",
    pacemaker_csv: Optional[str] = None,
    on_error: Literal["raise", "skip"] = "raise",
    verify: Literal["header", "decode"] = "header",
    bit_depth: Optional[int] = None,
    invert: bool = False,
) -> CheXpertDataset:
    """CheXpert split "train" or "valid" from `ROOT/CheXpert-v1.0-small/<split>.csv`, 1-channel images.

    `view` keeps frontal, lateral or all images. `uncertainty` maps -1 (uncertain) to 1 ("ones",
    U-Ones), 0 ("zeros", U-Zeros) or NaN ("ignore": unknown, left out of attribute statistics).
    `pacemaker_csv` (rows: image path as in `Path`, PM 0/1) adds a `Pacemaker` attribute, NaN
    for images it does not list. Every row is checked up front (label values, image file exists):
    `on_error="raise"` stops at the first bad row, "skip" drops bad rows with one warning.
    Every kept image's header is read too (unreadable files are bad rows); verify="decode" reads
    every image in full instead, which also finds truncated JPEG bodies. bit_depth / invert: see
    `Intensity`, for images re-exported from DICOM (12-bit data in 16-bit PNGs, MONOCHROME1).
    """
    if download:
        raise ValueError(
            "CheXpert cannot be downloaded automatically (Stanford's research-use agreement): register at "
            f"https://stanfordmlgroup.github.io/competitions/chexpert/, unpack {FOLDER}/ under data.root ({root})"
        )
    if split not in CSV_FILES:
        raise ValueError(f"split={split!r}; CheXpert-v1.0-small splits are {list(CSV_FILES)}")
    choices = {
        "view": (view, ("frontal", "lateral", "all")),
        "uncertainty": (uncertainty, tuple(UNCERTAIN)),
        "on_error": (on_error, ("raise", "skip")),
        "verify": (verify, ("header", "decode")),
    }
    for option, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{option}={value!r}; expected one of {list(allowed)}")
    intensity = Intensity(bit_depth, invert)
    base = Path(root)
    csv_path = base / FOLDER / CSV_FILES[split]
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"{csv_path} not found: expected the official layout ROOT/{FOLDER}/train.csv and valid.csv "
            f"with the images under ROOT/{FOLDER}/{{train,valid}}/patient*/study*/view*.jpg (ROOT = {root})"
        )
    pm_problems: list[str] = []
    pacemaker = read_pacemaker_csv(Path(pacemaker_csv), pm_problems) if pacemaker_csv else None
    if pm_problems and on_error == "raise":
        raise ValueError(f"{pm_problems[0]}; pass on_error='skip' to ignore such rows (Pacemaker then NaN)")

    problems: list[str] = []
    files: list[str] = []
    lines: list[int] = []
    keys: list[str] = []  # for matching pacemaker_csv rows
    table: list[list[float]] = []
    n_rows = 0
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [c.strip() for c in next(reader, [])]
        needed = ["Path", *FINDINGS] + ([VIEW_COLUMN] if view != "all" else [])
        missing = [c for c in needed if c not in header]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}; the header is {header}")
        col = {c: header.index(c) for c in needed}
        policy = UNCERTAIN[uncertainty]
        fast = {"": 0.0, "1.0": 1.0, "0.0": 0.0, "-1.0": policy}  # the official spellings, without parsing
        finding_cols = [col[name] for name in FINDINGS]
        for row in reader:
            if not any(c.strip() for c in row):
                continue
            n_rows += 1
            where = f"{csv_path} line {reader.line_num}"
            if len(row) < len(header):
                problem: Optional[Exception] = ValueError(f"{where}: {len(row)} fields, the header has {len(header)}")
            else:
                problem = None
                if view != "all":
                    v = row[col[VIEW_COLUMN]].strip()
                    if v not in ("Frontal", "Lateral"):
                        problem = ValueError(f"{where}: column {VIEW_COLUMN!r} has {v!r}, expected 'Frontal' or 'Lateral'")
                    elif v.lower() != view:
                        continue  # left out by the view option: not a problem
                values = [fast.get(row[i]) if row[i] in fast else _label(row[i], policy) for i in finding_cols]
                if problem is None and None in values:
                    name = FINDINGS[values.index(None)]
                    problem = ValueError(f"{where}: column {name!r} has {row[col[name]]!r}, expected 1.0, 0.0, -1.0 or blank")
                rel = row[col["Path"]].strip()
                full = os.path.join(root, rel)  # os.path, not pathlib: ~2x faster over CheXpert's 223k rows
                if problem is None and not (rel and os.path.isfile(full)):
                    problem = FileNotFoundError(f"{where}: image {rel!r} does not exist (looked for {full})")
            if problem is not None:
                if on_error == "raise":
                    raise type(problem)(f"{problem}; pass on_error='skip' to drop such rows")
                problems.append(str(problem))
                continue
            files.append(full)
            lines.append(reader.line_num)
            keys.append(path_key(rel))
            table.append(values)  # type: ignore[arg-type]  # no None left here

    good = []
    for i, full in enumerate(files):
        why = image_problem(Path(full), 1, verify, intensity)
        if why is None:
            good.append(i)
        elif on_error == "raise":
            raise ValueError(f"{why} (listed in {csv_path} line {lines[i]}); pass on_error='skip' to drop such rows")
        else:
            problems.append(f"{why} (line {lines[i]})")
    if len(good) < len(files):
        files, lines, keys, table = ([seq[i] for i in good] for seq in (files, lines, keys, table))

    names = list(FINDINGS)
    attributes = torch.tensor(table, dtype=torch.float32).reshape(len(table), len(FINDINGS))
    if pacemaker is not None:
        pm = torch.tensor([pacemaker.get(k, float("nan")) for k in keys])
        attributes = torch.cat([attributes, pm[:, None].float()], dim=1)
        names.append("Pacemaker")
        if pacemaker and files and not any(k in pacemaker for k in keys):
            warnings.warn(
                f"pacemaker_csv {pacemaker_csv}: none of its {len(pacemaker)} paths matches an image of "
                f"{csv_path}, so Pacemaker is unknown (NaN) for every row; are its paths like the Path column?",
                stacklevel=2,
            )
    if problems or pm_problems:
        offenders = problems + pm_problems
        shown = "; ".join(offenders[:SHOWN]) + ("; ..." if len(offenders) > SHOWN else "")
        what = [f"skipped {len(problems)} of {n_rows} rows of {csv_path}"] if problems else []
        if pm_problems:
            what.append(f"ignored {len(pm_problems)} rows of pacemaker_csv {pacemaker_csv} (Pacemaker NaN there)")
        warnings.warn(f"CheXpert {split}: {' and '.join(what)}: {shown}", stacklevel=2)
    if not files:
        raise ValueError(f"{csv_path}: no usable rows (view={view!r}, {n_rows} rows read, {len(problems)} bad)")
    warn_if_few_bits_used([Path(f) for f in files], intensity, f"CheXpert {split} ({csv_path})")
    return CheXpertDataset(csv_path, files, lines, attributes, names, image_size, intensity)
