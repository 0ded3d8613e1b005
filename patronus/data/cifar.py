"""CIFAR-10 (Krizhevsky 2009) from torchvision's python batches or from class folders of images."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from patronus.data.checks import OnError, Problem, Verify, check_on_error, image_problem, resolve_problems
from patronus.data.datasets import LabelledImageDataset, to_model_range
from patronus.data.folders import AttributeFolderDataset
from patronus.data.images import list_images

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]  # labels 0-9
BATCHES = "cifar-10-batches-py"
Layout = Literal["auto", "python", "folders"]


class UInt8ImageDataset(LabelledImageDataset):
    """Images held as uint8 (N, C, H, W) — 150 MB for CIFAR-10 train instead of 600 MB as float —
    converted to [-1, 1] at image_size one at a time."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str], image_size: int):
        self.images, self.labels, self.image_size = images, labels, image_size
        self.classes, self.attribute_names = list(classes), list(classes)
        self.attributes = F.one_hot(labels, len(classes)).float()

    def load_image(self, i: int) -> torch.Tensor:
        return to_model_range(self.images[i : i + 1], self.image_size)[0]


def _python_layout(root: Path, split: str, image_size: int, download: bool) -> UInt8ImageDataset:
    """torchvision's ROOT/cifar-10-batches-py/, read (and MD5-checked) by torchvision.datasets.CIFAR10."""
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR-10 split {split!r} is unknown for the python batches; expected 'train' or 'test'")
    folder = root / BATCHES
    if not folder.is_dir() and not download:
        raise FileNotFoundError(
            f"{folder} not found; expected torchvision's layout ROOT/{BATCHES}/data_batch_1..5, test_batch (pass download=true to fetch it)"
        )
    import torchvision

    try:
        ds = torchvision.datasets.CIFAR10(str(root), train=split == "train", download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise RuntimeError(f"{folder}: torchvision could not read the CIFAR-10 batches (a file is missing or its MD5 differs): {e}") from e
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
    return UInt8ImageDataset(images, torch.tensor(ds.targets, dtype=torch.long), CLASSES, image_size)


def _folder_layout(root: Path, split: str, image_size: int, on_error: OnError, verify: Verify) -> AttributeFolderDataset:
    """ROOT/<split>/<class>/*.jpg|png with the 10 CIFAR class names as folders (decoded lazily)."""
    folder = root / split
    if not folder.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise FileNotFoundError(f"{folder} not found; expected ROOT/<split>/<class>/*.jpg (ROOT holds folders {present})")
    files = list_images(folder)
    loose = [f for f in files if f.parent == folder]
    if loose:
        raise ValueError(f"{loose[0]}: image directly in {folder}; expected it in a class folder ({', '.join(CLASSES)})")
    found = sorted({f.relative_to(folder).parts[0] for f in files})
    unknown = [c for c in found if c not in CLASSES]
    if unknown:
        raise ValueError(f"{folder}: class folder(s) {unknown} are not CIFAR-10 classes; expected {CLASSES}")
    problems: list[Problem] = []
    kept = []
    for f in files:
        why = image_problem(f, 3, verify)
        if why:
            problems.append(Problem(ValueError, why))
        else:
            kept.append(f)
    resolve_problems(problems, on_error, f"CIFAR-10 {folder}", len(files), unit="image files")
    labels = torch.tensor([CLASSES.index(f.relative_to(folder).parts[0]) for f in kept], dtype=torch.long)
    return AttributeFolderDataset(kept, image_size, 3, labels, F.one_hot(labels, len(CLASSES)).float(), CLASSES, CLASSES)


def cifar10(
    root: str,
    split: str,
    image_size: int,
    download: bool = False,
    *,
    layout: Layout = "auto",
    on_error: OnError = "raise",
    verify: Verify = "header",
) -> LabelledImageDataset:
    """CIFAR-10 split ("train"/"test"; any folder name for the folders layout): labels = class index,
    classes = airplane..truck (CIFAR's order, also alphabetical), attributes = one-hot classes.

    layout="python": torchvision's ROOT/cifar-10-batches-py/ (pixel-exact; download=True fetches it).
    layout="folders": ROOT/<split>/<class>/*.jpg, e.g. ../shared/datasets/cifar10_jpeg (lossy JPEGs:
    fine for training, not for FID against published numbers). layout="auto": the python batches if
    present, else the split folder, else download if asked, else an error naming both layouts.
    on_error applies to the folders layout (unreadable or grayscale files, and with verify="decode"
    truncated ones): raise, or skip with a warning that counts them.
    """
    check_on_error(on_error, verify)
    base = Path(root)
    if layout not in ("auto", "python", "folders"):
        raise ValueError(f"CIFAR-10 layout={layout!r}; expected 'auto', 'python' or 'folders'")
    if layout == "auto":
        if (base / BATCHES).is_dir() or (download and not (base / split).is_dir()):
            layout = "python"
        elif (base / split).is_dir():
            layout = "folders"
        else:
            raise FileNotFoundError(
                f"CIFAR-10: neither {base / BATCHES} (torchvision's python batches) nor {base / split} "
                f"(class folders ROOT/<split>/<class>/*.jpg) exists (pass download=true to fetch the batches)"
            )
    if layout == "python":
        return _python_layout(base, split, image_size, download)
    if download:
        raise ValueError("CIFAR-10 layout='folders' cannot be downloaded; use layout='python' (or 'auto') with download=true")
    return _folder_layout(base, split, image_size, on_error, verify)
