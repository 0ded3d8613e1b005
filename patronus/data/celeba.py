"""CelebA (Liu et al., ICCV 2015) from its official files: aligned faces + the 40-attribute table.

Layout (as distributed by CUHK; torchvision's ROOT/celeba/ is found too):
    ROOT/img_align_celeba/000001.jpg ... 202599.jpg   (178x218 aligned faces)
    ROOT/list_attr_celeba.txt     line 1: row count; line 2: the 40 names; then `000001.jpg  -1  1 ...`
    ROOT/list_eval_partition.txt  `000001.jpg 0` (0 train, 1 valid, 2 test)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from torchvision.transforms.functional import resize

from patronus.data.checks import OnError, Problem, Verify, check_on_error, image_problem, resolve_problems
from patronus.data.datasets import LabelledImageDataset
from patronus.data.images import read_image

SPLITS = {"train": 0, "valid": 1, "test": 2}
# Official partition by image number (list_eval_partition.txt): used when that file is absent.
LAST_TRAIN, LAST_VALID = 162770, 182637
Crop = Literal["center", "squash"]


class CelebADataset(LabelledImageDataset):
    """Face images decoded lazily; attributes (N, 40) in memory, labels all -1 (CelebA has no class)."""

    def __init__(self, files: Sequence[Path], attributes: torch.Tensor, attribute_names: Sequence[str], image_size: int, crop: Crop):
        self.files, self.image_size, self.crop = list(files), image_size, crop
        self.attributes, self.attribute_names = attributes, list(attribute_names)
        self.labels = torch.full((len(self.files),), -1, dtype=torch.long)
        self.classes: list[str] = []

    def load_image(self, i: int) -> torch.Tensor:
        if self.crop == "squash":
            return read_image(self.files[i], 3, resize_to=self.image_size)
        return center_square(read_image(self.files[i], 3), self.image_size)


def center_square(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """Central min(H, W) square (178x178 of a 178x218 face, 20 px off the top and bottom), resized."""
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = round((h - side) / 2), round((w - side) / 2)
    x = x[..., top : top + side, left : left + side]
    return resize(x, [image_size, image_size], antialias=True).clamp(-1, 1)


def _layout_root(root: Path, image_dir: str, attr_file: str, download: bool) -> Path:
    """ROOT, or torchvision's ROOT/celeba/ (also where download=True puts the files)."""
    for base in (root, root / "celeba"):
        if (base / attr_file).is_file() and (base / image_dir).is_dir():
            return base
    if download:  # torchvision fetches from Google Drive (needs gdown) and checks the MD5s
        import torchvision

        torchvision.datasets.CelebA(str(root), split="all", target_type="attr", download=True)
        return root / "celeba"
    missing = [str(p) for p in (root / attr_file, root / image_dir) if not p.exists()]
    raise FileNotFoundError(
        f"CelebA: {' and '.join(missing)} not found; expected the official layout ROOT/{image_dir}/*.jpg, "
        f"ROOT/{attr_file} and ROOT/list_eval_partition.txt (or torchvision's ROOT/celeba/...). For the "
        "89x109 subset in ../shared/datasets/celeba_subset pass image_dir='img_align_celeba_89x109', "
        "attr_file='list_attr_celeba_000001-010000.txt', partition_file=None"
    )


@dataclass
class AttributeTable:
    names: list[str]  # the attribute names (line 2)
    files: list[str]  # image file name per good row
    lines: list[int]  # its line number in the file
    values: np.ndarray  # (rows, attributes) int8, 1 = present, 0 = absent
    rows: int  # data rows in the file, good and bad


def read_attributes(path: Path, problems: list[Problem]) -> AttributeTable:
    """Parse list_attr_celeba.txt (CRLF or LF); bad rows become Problems, a bad header raises.

    A vectorised pass reads a clean file (202,599 rows) in well under a second; only a file with
    bad rows takes the slow line-by-line pass that names them.
    """
    lines = path.read_text().splitlines()  # CRLF or LF
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise ValueError(f"{path}: line 1 must be the row count and line 2 the attribute names (CelebA list_attr format)")
    count, names = int(lines[0]), lines[1].split()
    numbered = [(n, line) for n, line in enumerate(lines[2:], start=3) if line.strip()]
    if len(numbered) != count:
        raise ValueError(f"{path}: line 1 says {count} rows but the file holds {len(numbered)} (truncated, or line 1 not updated)")
    table = _read_clean(names, numbered)
    if table is not None:
        return table
    files: list[str] = []
    linenos: list[int] = []
    rows: list[list[str]] = []
    seen: dict[str, int] = {}
    for lineno, line in numbered:
        parts = line.split()
        if len(parts) != len(names) + 1:
            problems.append(
                Problem(ValueError, f"{path} line {lineno}: {len(parts) - 1} values, expected {len(names)} (one per attribute)")
            )
        elif not set(parts[1:]) <= {"1", "-1"}:
            k = next(k for k, v in enumerate(parts[1:]) if v not in ("1", "-1"))
            problems.append(Problem(ValueError, f"{path} line {lineno}, attribute {names[k]!r}: value {parts[k + 1]!r}; expected 1 or -1"))
        elif parts[0] in seen:
            problems.append(Problem(ValueError, f"{path} line {lineno}: {parts[0]} already listed on line {seen[parts[0]]}"))
        else:
            seen[parts[0]] = lineno
            files.append(parts[0])
            linenos.append(lineno)
            rows.append(parts[1:])
    values = (np.array(rows, dtype="<U2") == "1").astype(np.int8).reshape(len(rows), len(names))
    return AttributeTable(names, files, linenos, values, count)


def _read_clean(names: list[str], numbered: list[tuple[int, str]]) -> Optional[AttributeTable]:
    """Fast path: the table if every row is `name` + len(names) values of ±1 and names are unique, else None."""
    files, tails = [], []
    for _, line in numbered:
        parts = line.split(None, 1)
        if len(parts) != 2 or parts[1].count("1") != len(names):  # each value, 1 or -1, holds one "1"
            return None
        files.append(parts[0])
        tails.append(parts[1])
    with warnings.catch_warnings():  # numpy warns (and stops) at a token it cannot parse: caught by the size check
        warnings.simplefilter("ignore")
        v = np.fromstring(" ".join(tails), dtype=np.int64, sep=" ") if tails else np.zeros(0, np.int64)
    if v.size != len(files) * len(names) or not np.isin(v, (1, -1)).all() or len(set(files)) != len(files):
        return None
    values = (v == 1).astype(np.int8).reshape(len(files), len(names))
    return AttributeTable(names, files, [n for n, _ in numbered], values, len(files))


def read_partition(path: Path) -> dict[str, int]:
    """list_eval_partition.txt -> {file name: 0/1/2}."""
    if not path.is_file():
        raise FileNotFoundError(
            f"CelebA partition file {path} not found; pass partition_file=None to use the official "
            f"boundaries by image number (train <= {LAST_TRAIN}, valid <= {LAST_VALID}, test after)"
        )
    out: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise ValueError(f"{path} line {lineno}: {line.strip()!r}; expected '<file name> <0|1|2>' (0 train, 1 valid, 2 test)")
        out[parts[0]] = int(parts[1])
    return out


def official_partition(name: str) -> Optional[int]:
    """Partition of `000123.jpg` from its number (the official boundaries); None if not numbered."""
    stem = Path(name).stem
    if not stem.isdigit():
        return None
    n = int(stem)
    return 0 if n <= LAST_TRAIN else 1 if n <= LAST_VALID else 2


def celeba(
    root: str,
    split: str,
    image_size: int,
    download: bool = False,
    *,
    crop: Crop = "center",
    image_dir: str = "img_align_celeba",
    attr_file: str = "list_attr_celeba.txt",
    partition_file: Optional[str] = "list_eval_partition.txt",
    on_error: OnError = "raise",
    verify: Verify = "header",
) -> CelebADataset:
    """CelebA split "train"/"valid"/"test"/"all": attributes = the 40 attributes as 1/0 (from ±1), labels -1.

    crop="center" (default): the central square of side min(W, H) — 178x178 of the 178x218 aligned
    faces, 89x89 of the 89x109 half-size subset — then resize to image_size; this is the common
    convention (the PyTorch DCGAN tutorial's Resize+CenterCrop). crop="squash": the whole image
    resized to a square, as the Patronus paper did; it distorts faces (squeezed vertically by 18%).

    partition_file=None: no partition file (e.g. the shared 10k subset); the split then follows the
    official boundaries by image number: 1-162770 train, 162771-182637 valid, 182638-202599 test.

    Bad rows (wrong number of values, values other than ±1, duplicates, images missing or whose
    header does not open as RGB, missing from the partition file) raise with the file and line
    under on_error="raise"; "skip" drops them and warns once with the count and first offenders.
    Every image header is read up front (one pass over the 202,599 files of full CelebA);
    a truncated image body is found then only with verify="decode" (every image read in full).
    """
    check_on_error(on_error, verify)
    if split not in (*SPLITS, "all"):
        raise ValueError(f"CelebA split {split!r} is unknown; expected one of {[*SPLITS, 'all']}")
    if crop not in ("center", "squash"):
        raise ValueError(f"CelebA crop={crop!r}; expected 'center' or 'squash'")
    base = _layout_root(Path(root), image_dir, attr_file, download)
    attr_path, images = base / attr_file, base / image_dir
    problems: list[Problem] = []
    table = read_attributes(attr_path, problems)
    partition = read_partition(base / partition_file) if partition_file and split != "all" else None

    keep: list[int] = []
    present = {p.name for p in images.iterdir()}
    for i, (name, line) in enumerate(zip(table.files, table.lines)):
        if split != "all":
            part = partition.get(name) if partition is not None else official_partition(name)
            if part is None:
                why = (
                    f"is not listed in {base / partition_file}"
                    if partition is not None
                    else "is not a numbered CelebA file, so its official split is unknown; pass partition_file"
                )
                problems.append(Problem(ValueError, f"{attr_path} line {line}: {name} {why}"))
                continue
            if part != SPLITS[split]:
                continue
        if name not in present:
            problems.append(
                Problem(FileNotFoundError, f"{images / name}: listed on line {line} of {attr_path} but the image does not exist")
            )
            continue
        why = image_problem(images / name, 3, verify)
        if why:
            problems.append(Problem(ValueError, f"{why} (line {line} of {attr_path})"))
            continue
        keep.append(i)
    resolve_problems(problems, on_error, f"CelebA {attr_path}", table.rows)
    if not keep:
        if problems:
            raise ValueError(
                f"CelebA split {split!r} has no usable rows ({len(problems)} bad rows dropped by on_error='skip', see the warning)"
            )
        source = (
            f"{base / partition_file}"
            if partition is not None
            else (f"the official boundaries by image number (partition_file=None: train <= {LAST_TRAIN}, valid <= {LAST_VALID})")
        )
        raise ValueError(f"CelebA split {split!r} is empty: none of the {len(table.files)} rows of {attr_path} belong to it by {source}")
    attributes = torch.from_numpy(table.values[keep]).float()
    return CelebADataset([images / table.files[i] for i in keep], attributes, table.names, image_size, crop)
