"""Standard on-disk layouts -> datasets yielding {"image": [-1,1] (C,H,W), "label": int, "attributes": (A,)}."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from patronus.data.checks import OnError, Problem, Verify, check_on_error, image_problem, resolve_problems, warn_if_few_bits_used
from patronus.data.images import AS_STORED, Intensity, list_images, read_image
from patronus.torch_utils import from_uint8


class LabelledImageDataset(Dataset):
    """The one contract every dataset meets, so analyses and shortcut builders work on any of them.

    Subclasses set `labels` (N,) long (−1 where there is no class), `attributes` (N, A) float
    (1/0, NaN = unknown), `attribute_names` (A names), `classes` (class names, maybe empty),
    and implement `load_image(i)` -> float (C, H, W) in [-1, 1]. Label tables live in memory,
    so builders can select rows without decoding a single image.
    """

    labels: torch.Tensor
    attributes: torch.Tensor
    attribute_names: list[str]
    classes: list[str]

    def load_image(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.load_image(i), "label": self.labels[i], "attributes": self.attributes[i]}


class SubsetDataset(LabelledImageDataset):
    """Rows `indices` of a base dataset, label tables sliced (no image is decoded to select)."""

    def __init__(self, base: LabelledImageDataset, indices: torch.Tensor):
        self.base, self.indices = base, indices.long()
        self.labels, self.attributes = base.labels[self.indices], base.attributes[self.indices]
        self.attribute_names, self.classes = list(base.attribute_names), list(base.classes)

    def load_image(self, i: int) -> torch.Tensor:
        return self.base.load_image(int(self.indices[i]))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.base[int(self.indices[i])]  # keeps what the base items carry beyond the image (marker masks)


def holdout_split(n: int, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, held-out rows), both sorted: a fixed, seeded `fraction` of n rows held out, for
    data without a validation split. Training and every analysis use this one definition."""
    if not 0 < fraction < 1:
        raise ValueError(f"data.holdout={fraction}; expected a fraction in (0, 1)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(fraction * n)))
    return order[n_val:].sort().values, order[:n_val].sort().values


class TensorImageDataset(LabelledImageDataset):
    """Images already decoded into memory (small sets: MNIST-like), resized once up front."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        attribute_names: Sequence[str],
        attributes: torch.Tensor,
        classes: Sequence[str] = (),
    ):
        self.images, self.labels = images, labels
        self.attribute_names, self.attributes, self.classes = list(attribute_names), attributes, list(classes)

    def load_image(self, i: int) -> torch.Tensor:
        return self.images[i]


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST's format), gzipped or not."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot decompress it (corrupt or truncated .gz: {e}); replace the file") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise ValueError(f"{path}: not an unsigned-byte idx file (bad magic number)")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {tuple(dims)} = {int(np.prod(dims))} bytes, file holds {data.size}")
    return data.reshape(dims)


def _find(raw_dir: Path, stem: str) -> Path:
    for candidate in (raw_dir / stem, raw_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{raw_dir}: missing {stem}(.gz); expected torchvision's layout ROOT/<Name>/raw/")


def to_model_range(images_u8: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [-1, 1] at image_size (bilinear, antialiased)."""
    x = from_uint8(images_u8)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(-1, 1)


def idx_dataset(name: str, classes: Sequence[str]) -> Callable[..., TensorImageDataset]:
    """Builder for MNIST-format datasets in torchvision's raw layout (ROOT/<name>/raw/*.gz)."""

    def build(root: str, split: str, image_size: int, download: bool = False) -> TensorImageDataset:
        if download:  # users online: torchvision fetches and checks the MD5s
            import torchvision

            getattr(torchvision.datasets, name)(root, train=split == "train", download=True)
        raw = Path(root) / name / "raw"
        if not raw.is_dir():
            raise FileNotFoundError(
                f"data root {root!r} has no {name}/raw/ folder; expected torchvision's layout "
                f"{root}/{name}/raw/*-idx*-ubyte.gz (pass download=true to fetch it)"
            )
        prefix = "train" if split == "train" else "t10k"
        images = read_idx(_find(raw, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(raw, f"{prefix}-labels-idx1-ubyte"))
        if len(images) != len(labels):
            raise ValueError(f"{raw}: {len(images)} images but {len(labels)} labels for split {split!r}")
        x = to_model_range(torch.from_numpy(images.copy())[:, None], image_size)
        y = torch.from_numpy(labels.astype(np.int64))
        return TensorImageDataset(x, y, list(classes), F.one_hot(y, len(classes)).float(), classes)

    return build


class ImageFolderDataset(LabelledImageDataset):
    """ROOT/<split>/<class>/*.png (or ROOT/<split>/*.png without classes), decoded lazily."""

    def __init__(
        self,
        root: str,
        split: str,
        image_size: int,
        channels: int,
        files: Optional[Sequence[Path]] = None,
        intensity: Intensity = AS_STORED,
    ):
        folder = Path(root) / split
        self.intensity = intensity
        self.files = list(files) if files is not None else list_images(folder)
        self.classes = sorted({p.parent.name for p in self.files if p.parent != folder})
        self.image_size, self.channels = image_size, channels
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = torch.tensor([index.get(p.parent.name, -1) for p in self.files])
        self.attribute_names = list(self.classes)
        onehot = F.one_hot(self.labels.clamp_min(0), max(len(self.classes), 1)).float()
        self.attributes = onehot * (self.labels >= 0)[:, None]

    def load_image(self, i: int) -> torch.Tensor:
        return read_image(self.files[i], self.channels, resize_to=self.image_size, intensity=self.intensity)


def image_folder(
    root: str,
    split: str,
    image_size: int,
    download: bool = False,
    channels: int = 3,
    on_error: OnError = "raise",
    verify: Verify = "header",
    bit_depth: Optional[int] = None,
    invert: bool = False,
) -> ImageFolderDataset:
    """Every image file is checked up front (header, or a full decode with verify="decode"):
    on_error="raise" stops at the first bad file, naming it; "skip" drops bad files with one warning.
    bit_depth / invert: see `Intensity` (12-bit DICOM exports in 16-bit PNGs, MONOCHROME1)."""
    check_on_error(on_error, verify)
    intensity = Intensity(bit_depth, invert)
    if download:
        raise ValueError("dataset 'image_folder' cannot be downloaded; point data.root at your folder")
    folder = Path(root) / split
    files = list_images(folder)
    checked = [(f, image_problem(f, channels, verify, intensity)) for f in files]
    problems = [Problem(ValueError, why) for _, why in checked if why]
    resolve_problems(problems, on_error, f"image_folder {folder}", len(files), unit="image files")
    kept = [f for f, why in checked if not why]
    if not kept:
        raise ValueError(f"image_folder {folder}: all {len(files)} image files were skipped (on_error='skip'); nothing to train on")
    warn_if_few_bits_used(kept, intensity, f"image_folder {folder}")
    return ImageFolderDataset(root, split, image_size, channels, kept, intensity)


DIGITS = [str(i) for i in range(10)]
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
