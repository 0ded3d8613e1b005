"""LightningDataModule over the dataset registry."""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from patronus.data.datasets import build_dataset


class PatronusDataModule(pl.LightningDataModule):
    """Train/val loaders for one registered dataset.

    Args:
        dataset: registry name (mnist, fashion_mnist, image_folder).
        root: folder holding the dataset in its publisher's layout.
        image_size: square side the images are resized to.
        channels: image channels (image_folder only; idx datasets are grayscale).
        train_subset / val_subset: use only the first N images (quick runs).
        val_split: split name used for validation (MNIST-like: "test").
    """

    def __init__(
        self,
        dataset: str = "mnist",
        root: str = "data",
        image_size: int = 32,
        channels: int = 1,
        batch_size: int = 64,
        val_batch_size: int = 64,
        num_workers: int = 0,
        train_subset: Optional[int] = None,
        val_subset: Optional[int] = 512,
        val_split: str = "test",
        download: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None

    def _build(self, split: str, limit: Optional[int]) -> Dataset:
        h = self.hparams
        extra = {"channels": h.channels} if h.dataset == "image_folder" else {}
        ds = build_dataset(h.dataset, h.root, split, h.image_size, download=h.download, **extra)
        return Subset(ds, range(min(limit, len(ds)))) if limit is not None else ds

    def prepare_data(self) -> None:
        if self.hparams.download:  # once per node, before setup on every rank
            self._build("train", 1)
            self._build(self.hparams.val_split, 1)

    def setup(self, stage: str) -> None:
        if self.train_set is None:
            self.train_set = self._build("train", self.hparams.train_subset)
            self.val_set = self._build(self.hparams.val_split, self.hparams.val_subset)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.hparams.val_batch_size, shuffle=False)

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            generator=torch.Generator().manual_seed(0) if shuffle else None,
        )
