"""`train.py --config ... --data.root PATH` trains on each dataset from its standard layout (real files)."""

import json

import pytest
import torch

from patronus.cli.train import PatronusCLI
from tests.conftest import REPO

TINY = str(REPO / "configs" / "mnist_tiny.yaml")

# (dataset, folder under ../shared/datasets, options, image channels, validation split)
CASES = [
    ("mnist", "", {}, 1, "test"),
    ("fashion_mnist", "", {}, 1, "test"),
    ("medmnist", "medmnist", {"name": "pneumoniamnist"}, 1, "val"),
    ("medmnist", "medmnist", {"name": "breastmnist"}, 1, "test"),
    (
        "celeba",
        "celeba_subset",
        {"image_dir": "img_align_celeba_89x109", "attr_file": "list_attr_celeba_000001-010000.txt", "partition_file": None},
        3,
        None,
    ),
    ("cifar10", "cifar10_jpeg", {"layout": "folders"}, 3, "test"),
    ("image_folder", "nih_cxr1000_64px", {}, 1, "valid"),
]


@pytest.mark.slow
@pytest.mark.parametrize("dataset,folder,options,channels,val_split", CASES, ids=[f"{c[0]}-{c[1] or 'raw'}" for c in CASES])
def test_two_training_steps_on_real_files(shared_datasets, tmp_path, dataset, folder, options, channels, val_split):
    train_split = "test" if dataset == "cifar10" else "train"  # the shared CIFAR copy has only its test split
    args = [
        "--config",
        TINY,
        "--logger",
        "none",
        "--run_dir",
        str(tmp_path),
        "--data.dataset",
        dataset,
        "--data.root",
        str(shared_datasets / folder),
        "--data.options",
        json.dumps(options),
        "--model.net.in_channels",
        str(channels),  # data.channels follows (linked)
        "--data.train_split",
        train_split,
        *(["--data.val_split", val_split] if val_split else ["--data.holdout", "0.05"]),
        "--trainer.fast_dev_run",
        "2",
        "--trainer.precision",
        "32",
    ]
    cli = PatronusCLI(args=args)
    before = cli.model.net.encoder.prototypes.detach().clone()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert batch["image"].shape[1:] == (channels, 32, 32) and batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["attributes"].shape[1] == len(cli.datamodule.train_set.attribute_names) > 0
    assert not torch.equal(before, cli.model.net.encoder.prototypes.detach())
