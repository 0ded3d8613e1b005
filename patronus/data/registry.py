"""The dataset registry: one named builder per on-disk layout (no substring matching on names)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from patronus.data.celeba import celeba
from patronus.data.chexpert import chexpert
from patronus.data.cifar import cifar10
from patronus.data.datasets import DIGITS, FASHION, LabelledImageDataset, idx_dataset, image_folder
from patronus.data.folders import attribute_folder, ffhq
from patronus.data.medmnist import medmnist
from patronus.data.streaming import streaming

DATASETS: dict[str, Callable[..., LabelledImageDataset]] = {
    "mnist": idx_dataset("MNIST", DIGITS),
    "fashion_mnist": idx_dataset("FashionMNIST", FASHION),
    "image_folder": image_folder,
    "attribute_folder": attribute_folder,
    "ffhq": ffhq,
    "cifar10": cifar10,
    "celeba": celeba,
    "medmnist": medmnist,
    "chexpert": chexpert,
    "streaming": streaming,  # written once by `python -m patronus prepare` (patronus.data.streaming)
}


def dataset_options(name: str) -> list[str]:
    """The keyword options dataset `name`'s builder accepts (beyond root/split/image_size/download)."""
    if name not in DATASETS:
        raise ValueError(f"data.dataset={name!r} is unknown; expected one of {sorted(DATASETS)}")
    params = inspect.signature(DATASETS[name]).parameters.values()
    return [
        p.name for p in params if p.name not in ("root", "split", "image_size", "download") and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]


def build_dataset(name: str, root: str, split: str, image_size: int, /, download: bool = False, **options) -> LabelledImageDataset:
    """Dataset `name` from its publisher's layout under `root`; `options` are that builder's keywords."""
    accepted = dataset_options(name)
    builder = DATASETS[name]
    # A builder with **kwargs checks them itself (streaming: the original dataset's options, as prepared).
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(builder).parameters.values())
    unknown = [] if takes_any else sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"data.options {unknown} not understood by dataset {name!r}; it accepts {accepted or 'no options'}")
    return builder(root, split, image_size, download=download, **options)
