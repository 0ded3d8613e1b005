"""Datasets from their publishers' layouts, shortcut builders, and the Lightning DataModule.

`PatronusDataModule` is imported lazily: reading data for an analysis must not load Lightning.
"""

from typing import Any

from patronus.data.images import read_image
from patronus.data.registry import DATASETS, build_dataset

__all__ = ["DATASETS", "PatronusDataModule", "build_dataset", "read_image"]


def __getattr__(name: str) -> Any:
    if name == "PatronusDataModule":
        from patronus.data.datamodule import PatronusDataModule

        return PatronusDataModule
    raise AttributeError(f"module 'patronus.data' has no attribute {name!r}")
