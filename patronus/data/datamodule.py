"""LightningDataModule over the dataset registry."""

from __future__ import annotations

import json
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from patronus.data.datasets import SubsetDataset, holdout_split
from patronus.data.registry import build_dataset, dataset_options
from patronus.data.streaming import resumable_loader, shortcut_error


class PatronusDataModule(pl.LightningDataModule):
    """Train/val loaders for one registered dataset.

    Args:
        root: folder holding the dataset in its publisher's layout.
        image_size: square side the images are resized to.
        channels: image channels for datasets that can convert (image folders; MedMNIST
            grey -> RGB); None keeps each dataset's own default.
        options: dataset-specific keywords of its builder (e.g. image_folder's `channels`).
        shortcut: a shortcut builder applied to every split, e.g. {kind: planted_marker,
            target: "1", p: 0.9, q: 0.1} (see patronus.data.shortcuts); its correlations are printed.
        train_subset / val_subset: use only the first N images (quick runs).
        dataset: registry name: mnist, fashion_mnist, cifar10, celeba, ffhq, medmnist, chexpert,
            image_folder, attribute_folder (see patronus.data.registry and docs/training.md), or streaming:
            data written by `python -m patronus prepare` (root: its folder or s3:// / gs:// URI),
            trained on with a resumable, rank-sharded loader (patronus.data.streaming).
        train_split / val_split: split names used for training and validation (MNIST-like:
            "train"/"test"; MedMNIST "train"/"val"; CelebA and CheXpert "train"/"valid").
        holdout: for data without a held-out split (the CelebA subset, FFHQ): validate on this
            fraction of train_split instead (a fixed, seeded choice); val_split is then unused.
    """

    def __init__(
        self,
        dataset: str = "mnist",
        root: str = "data",
        image_size: int = 32,
        channels: Optional[int] = None,
        batch_size: int = 64,
        val_batch_size: int = 64,
        num_workers: int = 0,  # loader processes per GPU; 0 = load in the training process (benchmarks/loader_throughput.py)
        pin_memory: bool = False,  # page-locked batches: asynchronous host->GPU copies; False = pageable (CPU runs gain nothing)
        persistent_workers: bool = True,  # keep workers across epochs and validation; False = restart them (num_workers > 0 only)
        train_subset: Optional[int] = None,
        val_subset: Optional[int] = 512,
        train_split: str = "train",
        val_split: str = "test",
        holdout: Optional[float] = None,
        download: bool = False,
        options: Optional[dict[str, Any]] = None,
        shortcut: Optional[dict[str, Any]] = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None

    def build_split(self, split: str, limit: Optional[int] = None) -> Dataset:
        """Split `split` as this DataModule reads it (options, channels, shortcut), its first `limit` rows."""
        h = self.hparams
        options = dict(h.options or {})
        if h.channels is not None and "channels" in dataset_options(h.dataset):
            options.setdefault("channels", h.channels)
        ds = build_dataset(h.dataset, h.root, split, h.image_size, download=h.download, **options)
        if h.shortcut and h.dataset == "streaming":  # its images are read as stored
            raise ValueError(shortcut_error(ds, h.shortcut))
        if h.shortcut:
            from patronus.data.shortcuts import apply_shortcut  # lazy: keeps `python -m patronus.data.shortcuts` clean

            ds, report = apply_shortcut(ds, h.image_size, h.shortcut)
            rank_zero_info(f"shortcut on {split!r}: {json.dumps(report)}")
        return SubsetDataset(ds, torch.arange(min(limit, len(ds)))) if limit is not None else ds

    def prepare_data(self) -> None:
        if self.hparams.download:  # once per node, before setup on every rank
            self.build_split(self.hparams.train_split, 1)
            self.build_split(self.hparams.val_split, 1)

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        h = self.hparams
        if h.holdout is None:
            self.train_set = self.build_split(h.train_split, h.train_subset)
            self.val_set = self.build_split(h.val_split, h.val_subset)
            return
        full = self.build_split(h.train_split, None)
        train, val = holdout_split(len(full), h.holdout)
        self.train_set = SubsetDataset(full, train[: h.train_subset] if h.train_subset else train)
        self.val_set = SubsetDataset(full, val[: h.val_subset] if h.val_subset else val)

    def train_dataloader(self) -> DataLoader:
        # Prepared data: litdata shards it across ranks and its position is saved in checkpoints.
        stream = resumable_loader(self.train_set, self.hparams.batch_size, self.hparams.num_workers)
        return stream if stream is not None else self._loader(self.train_set, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.hparams.val_batch_size, shuffle=False)

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.hparams.num_workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=self.hparams.persistent_workers and self.hparams.num_workers > 0,
            # Its own generator also when not shuffling: a loader without one draws its workers' base
            # seed from the global RNG, so every validation would shift the training noise after it.
            generator=torch.Generator().manual_seed(0),
        )
