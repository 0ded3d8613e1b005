from patronus.data.datamodule import PatronusDataModule
from patronus.data.registry import DATASETS, build_dataset
from patronus.data.images import read_image

__all__ = ["DATASETS", "PatronusDataModule", "build_dataset", "read_image"]
