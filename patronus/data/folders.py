"""Image folders with an optional attributes CSV (FFHQ and any user folder)."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from patronus.data.checks import OnError, Problem, Verify, check_on_error, image_problem, resolve_problems, warn_if_few_bits_used
from patronus.data.datasets import LabelledImageDataset
from patronus.data.images import AS_STORED, Intensity, list_images, read_image

SPLIT_NAMES = ("train", "valid", "val", "test")  # folders that mark ROOT as split into subfolders

# Attribute folder ----------------------------------------------------------------------------


class AttributeFolderDataset(LabelledImageDataset):
    """Image files (any size, resized to a square `image_size`) with per-file label/attribute tables."""

    def __init__(
        self,
        files: Sequence[Path],
        image_size: int,
        channels: int,
        labels: torch.Tensor,
        attributes: torch.Tensor,
        attribute_names: Sequence[str],
        classes: Sequence[str] = (),
        intensity: Intensity = AS_STORED,
        mask_files: Optional[Sequence[Path]] = None,
    ):
        self.files, self.image_size, self.channels = list(files), image_size, channels
        self.labels, self.attributes = labels, attributes
        self.attribute_names, self.classes = list(attribute_names), list(classes)
        self.intensity = intensity
        self.mask_files = list(mask_files) if mask_files is not None else None

    def load_image(self, i: int) -> torch.Tensor:
        return read_image(self.files[i], self.channels, resize_to=self.image_size, intensity=self.intensity)

    def load_mask(self, i: int) -> torch.Tensor:
        """(1, H, W) 0/1 confounder mask of image i (all zeros where its mask file is absent)."""
        f = self.mask_files[i]
        if not f.is_file():
            return torch.zeros(1, self.image_size, self.image_size)
        return (read_image(f, 1, resize_to=self.image_size) > 0).float()

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        if self.mask_files is not None:
            item["marker_mask"] = self.load_mask(i)
        return item


def _split_folder(root: Path, split: str) -> Path:
    """ROOT/<split>, or ROOT itself for split "train" when ROOT holds the images (FFHQ ships as one folder)."""
    folder = root / split
    if folder.is_dir():
        return folder
    if not root.is_dir():
        raise FileNotFoundError(
            f"data root {root} does not exist; expected ROOT/<split>/**/*.png|jpg or, for split 'train', images under ROOT"
        )
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name in SPLIT_NAMES)
    if split == "train" and not present:
        return root  # list_images raises if there are none
    raise FileNotFoundError(
        f"{folder}: split folder does not exist; expected ROOT/<split>/**/*.png|jpg"
        + (f" (ROOT has split folders {present})" if present else " (only split 'train' may use ROOT itself)")
    )


def _norm(p: str) -> str:
    p = p.strip().replace("\\", "/")
    while p.startswith("./"):
        p = p[2:]
    return p


def _number(value: str) -> Optional[float]:
    """CSV cell -> float; blank/NaN -> nan; None when it is not a number."""
    v = value.strip()
    if v == "" or v.lower() in ("nan", "na"):
        return math.nan
    try:
        return float(v)
    except ValueError:
        return None


@dataclass
class _Table:
    rows: dict[str, tuple[list[float], str]]  # relative path -> (attribute values, raw label)
    attribute_names: list[str]
    label_column: Optional[str]
    count: int  # data rows read, good and bad


def _read_attributes_csv(csv_path: Path, root: Path, split_folder: Path, path_column: str, problems: list[Problem]) -> _Table:
    """Parse the CSV (paths relative to ROOT); bad rows become Problems, structural errors raise."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"attributes_csv {csv_path} does not exist (relative paths are taken from ROOT={root})")
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        if path_column not in header:
            raise ValueError(f"{csv_path}: no column {path_column!r} (path_column) in the header; found columns {header}")
        if any(h == "" for h in header):
            raise ValueError(f"{csv_path}: header has an empty column name (column {header.index('') + 1}): {header}")
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise ValueError(f"{csv_path}: duplicate column names {dupes}")
        label_cols = [h for h in header if h in ("label", "class")]
        if len(label_cols) > 1:
            raise ValueError(f"{csv_path}: both 'label' and 'class' columns; keep one as the class column")
        label_column = label_cols[0] if label_cols else None
        names = [h for h in header if h not in (path_column, label_column)]
        pi, li = header.index(path_column), header.index(label_column) if label_column else None
        ai = [header.index(n) for n in names]
        rows: dict[str, tuple[list[float], str]] = {}
        seen: dict[str, int] = {}
        count = 0
        for cells in reader:
            line = reader.line_num
            if not cells or all(c.strip() == "" for c in cells):
                continue
            count += 1
            where = f"{csv_path}: row on line {line}"
            if len(cells) != len(header):
                problems.append(Problem(ValueError, f"{where}: {len(cells)} cells, expected {len(header)} (columns {header})"))
                continue
            rel = _norm(cells[pi])
            if rel == "":
                problems.append(Problem(ValueError, f"{where}: empty {path_column!r}"))
                continue
            if not (root / rel).is_file():
                hint = (
                    f"; paths are relative to ROOT, did you mean {split_folder.relative_to(root).as_posix()}/{rel}?"
                    if (split_folder != root and (split_folder / rel).is_file())
                    else ""
                )
                problems.append(Problem(FileNotFoundError, f"{where} ({path_column}={cells[pi]!r}): {root / rel} does not exist{hint}"))
                continue
            if rel in seen:
                problems.append(Problem(ValueError, f"{where}: {rel!r} already listed on line {seen[rel]}"))
                continue
            values, bad = [], None
            for n, j in zip(names, ai):
                x = _number(cells[j])
                if x is None or not (math.isnan(x) or x in (-1.0, 0.0, 1.0)):
                    bad = f"{where}, column {n!r}: value {cells[j]!r}; expected 1, 0, -1 or blank (unknown)"
                    break
                values.append(x)
            label = cells[li].strip() if li is not None else ""
            if label.startswith("-") and label[1:].isdigit():
                bad = f"{where}, column {label_column!r}: class {label}; expected an index >= 0 or a name (blank = no class)"
            if bad:
                problems.append(Problem(ValueError, bad))
                continue
            seen[rel] = line
            rows[rel] = (values, label)
    if names and rows:
        col = torch.tensor([v for v, _ in rows.values()], dtype=torch.float32)
        for k, n in enumerate(names):
            if bool((col[:, k] == -1).any()) and bool((col[:, k] == 0).any()):
                raise ValueError(
                    f"{csv_path}, column {n!r}: holds -1, 0 and 1; expected 0/1 or -1/1 (a -1/0/1 column, such as "
                    "CheXpert's uncertain labels, is ambiguous: map it to 0/1/blank first)"
                )
    return _Table(rows, names, label_column, count)


def _classes(raw: Iterable[str]) -> tuple[list[str], dict[str, int]]:
    """Class names and index of a class column over the WHOLE CSV (so every split agrees):
    if every value is an integer it is the index itself ("0".."max"), otherwise names sorted."""
    given = sorted({r for r in raw if r != ""})
    if all(r.isdigit() for r in given):
        classes = [str(k) for k in range(max((int(r) for r in given), default=-1) + 1)]
        return classes, {r: int(r) for r in given}
    return given, {c: i for i, c in enumerate(given)}


def attribute_folder(
    root: str,
    split: str,
    image_size: int,
    download: bool = False,
    *,
    channels: int = 3,
    attributes_csv: Optional[str] = None,
    path_column: str = "image",
    on_error: OnError = "raise",
    verify: Verify = "header",
    bit_depth: Optional[int] = None,
    invert: bool = False,
    masks: Optional[str] = None,
) -> AttributeFolderDataset:
    """Images under ROOT/<split>/ (nested folders allowed, sorted), with optional per-image attributes.

    If ROOT/<split> does not exist, split "train" uses ROOT itself when it has no split folders
    (FFHQ ships as one folder). Images of any size are resized (squashed) to image_size.

    attributes_csv (a path, relative to ROOT unless absolute): column `path_column` holds image paths
    RELATIVE TO ROOT (e.g. `train/0001.png`), so one CSV serves every split; the other columns are
    binary attributes, 0/1 or -1/1 (-1 -> 0), blank = unknown (NaN). A `label` or `class` column
    gives the class (integers = indices, otherwise names, sorted); without one labels are -1. If the
    CSV has a class column but no attribute columns, the attributes are the one-hot classes.
    Images missing from the CSV get NaN attributes and label -1. Rows naming files that do not exist,
    duplicates and non-binary values are bad rows; every image file's header is checked too
    (unreadable, or grayscale when channels=3), or every image read in full with verify="decode"
    (finds truncated bodies). on_error="raise" raises on the first, naming the file and row; "skip"
    drops them (a dropped CSV row leaves its image with unknown attributes) and warns once with the count.
    bit_depth / invert: see `Intensity` (12-bit DICOM exports in 16-bit PNGs, MONOCHROME1).

    masks (a folder, relative to ROOT unless absolute): ground-truth confounder masks, one PNG per
    image at the image's path relative to ROOT (e.g. `masks/train/0001.png`; white = confounder, an
    absent file = none); items then carry `marker_mask`, which lets the shortcut report score itself
    (`python -m patronus.cli.shortcut_data ... --out_dir` writes this layout).
    """
    check_on_error(on_error, verify)
    intensity = Intensity(bit_depth, invert)
    if download:
        raise ValueError("dataset 'attribute_folder' cannot be downloaded; point data.root at your image folder")
    base = Path(root)
    folder = _split_folder(base, split)
    files = list_images(folder)
    problems: list[Problem] = []
    table = _read_attributes_csv(base / attributes_csv, base, folder, path_column, problems) if attributes_csv else None
    kept: list[Path] = []
    for f in files:
        why = image_problem(f, channels, verify, intensity)
        if why:
            problems.append(Problem(ValueError, why))
        else:
            kept.append(f)
    what = f"attribute_folder {folder}" + (f" with {base / attributes_csv}" if table else "")
    resolve_problems(problems, on_error, what, (table.count if table else 0) + len(files), unit="CSV rows and image files")
    if not kept:
        raise ValueError(f"{what}: all {len(files)} image files were skipped (on_error='skip'); nothing to train on")
    warn_if_few_bits_used(kept, intensity, what)

    names = list(table.attribute_names) if table else []
    rows = [table.rows.get(f.relative_to(base).as_posix()) if table else None for f in kept]
    unknown = [math.nan] * len(names)
    attributes = torch.tensor([r[0] if r else unknown for r in rows], dtype=torch.float32).reshape(len(kept), len(names))
    attributes[attributes == -1] = 0  # -1/1 columns (a -1/0/1 column was refused above)
    classes: list[str] = []
    labels = torch.full((len(kept),), -1, dtype=torch.long)
    if table and table.label_column:
        classes, index = _classes(lab for _, lab in table.rows.values())
        labels = torch.tensor([index[r[1]] if r and r[1] else -1 for r in rows], dtype=torch.long)
        if not names:  # only a class column: attributes are the one-hot classes, as for class folders
            names = list(classes)
            onehot = F.one_hot(labels.clamp_min(0), max(len(classes), 1)).float()[:, : len(classes)]
            attributes = torch.where((labels >= 0)[:, None], onehot, torch.full_like(onehot, math.nan))
    mask_files = None
    if masks is not None:
        mask_root = base / masks
        if not mask_root.is_dir():
            raise FileNotFoundError(f"masks folder {mask_root} does not exist (relative paths are taken from ROOT={base})")
        mask_files = [(mask_root / f.relative_to(base)).with_suffix(".png") for f in kept]
    return AttributeFolderDataset(kept, image_size, channels, labels, attributes, names, classes, intensity, mask_files)


def ffhq(
    root: str,
    split: str,
    image_size: int,
    download: bool = False,
    *,
    channels: int = 3,
    attributes_csv: Optional[str] = None,
    path_column: str = "image",
    on_error: OnError = "raise",
    verify: Verify = "header",
) -> AttributeFolderDataset:
    """FFHQ (NVlabs/ffhq-dataset): point ROOT at `images1024x1024/` or `thumbnails128x128/` (its
    00000/..69000/ subfolders are read in sorted order) and use split "train" — FFHQ has no official
    split. Same options as `attribute_folder` (e.g. an attributes CSV with paths like `00000/00000.png`).
    """
    if download:
        raise ValueError(
            "dataset 'ffhq' cannot be downloaded here (NVlabs' download_ffhq.py fetches it from Google Drive); "
            "point data.root at the images1024x1024/ or thumbnails128x128/ folder"
        )
    return attribute_folder(
        root,
        split,
        image_size,
        channels=channels,
        attributes_csv=attributes_csv,
        path_column=path_column,
        on_error=on_error,
        verify=verify,
    )


__all__ = ["AttributeFolderDataset", "attribute_folder", "ffhq"]
