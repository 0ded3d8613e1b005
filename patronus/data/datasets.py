"""Standard on-disk layouts -> datasets yielding {"image": [-1,1] (C,H,W), "label": int, "attributes": (A,)}."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from patronus.data.images import list_images, read_image


class TensorImageDataset(Dataset):
    """Images already decoded into memory (small sets: MNIST-like), resized once up front."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, attribute_names: Sequence[str], attributes: torch.Tensor):
        self.images, self.labels = images, labels
        self.attribute_names, self.attributes = list(attribute_names), attributes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i], "attributes": self.attributes[i]}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST's format), gzipped or not."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
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
    x = images_u8.float() / 127.5 - 1
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(-1, 1)


def idx_dataset(
    name: str, classes: Sequence[str]
) -> Callable[..., TensorImageDataset]:
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
        return TensorImageDataset(x, y, list(classes), F.one_hot(y, len(classes)).float())

    return build


class ImageFolderDataset(Dataset):
    """ROOT/<split>/<class>/*.png (or ROOT/<split>/*.png without classes), decoded lazily."""

    def __init__(self, root: str, split: str, image_size: int, channels: int):
        folder = Path(root) / split
        self.files = list_images(folder)
        self.classes = sorted({p.parent.name for p in self.files if p.parent != folder})
        self.image_size, self.channels = image_size, channels
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = [index.get(p.parent.name, -1) for p in self.files]
        self.attribute_names = self.classes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = read_image(self.files[i], self.channels, resize_to=self.image_size)
        y = self.labels[i]
        attrs = F.one_hot(torch.tensor(max(y, 0)), max(len(self.classes), 1)).float() * (y >= 0)
        return {"image": x, "label": torch.tensor(y), "attributes": attrs}


def image_folder(root: str, split: str, image_size: int, download: bool = False, channels: int = 3) -> ImageFolderDataset:
    if download:
        raise ValueError("dataset 'image_folder' cannot be downloaded; point data.root at your folder")
    return ImageFolderDataset(root, split, image_size, channels)


DIGITS = [str(i) for i in range(10)]
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

# Named registry: one builder per on-disk layout, no substring matching on names.
DATASETS: dict[str, Callable[..., Dataset]] = {
    "mnist": idx_dataset("MNIST", DIGITS),
    "fashion_mnist": idx_dataset("FashionMNIST", FASHION),
    "image_folder": image_folder,
}


def build_dataset(name: str, root: str, split: str, image_size: int, download: bool = False, **kwargs) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"data.dataset={name!r} is unknown; expected one of {sorted(DATASETS)}")
    return DATASETS[name](root, split, image_size, download=download, **kwargs)
