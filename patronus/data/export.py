"""Writing a dataset to disk in the `attribute_folder` layout, so a built stress test (a planted
marker, a correlated subset) trains and is analysed exactly like a user's own image folder:

    OUT/<split>/<row>.png            images (8-bit PNG, grayscale or RGB)
    OUT/masks/<split>/<row>.png      confounder masks of the images that carry one (white = marker)
    OUT/attributes.csv               image,label,<attributes...> (paths relative to OUT)

Read it back with `data.dataset: attribute_folder`, `data.options: {attributes_csv: attributes.csv,
masks: masks}`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from PIL import Image

from patronus.data.datasets import LabelledImageDataset
from patronus.torch_utils import to_uint8

CSV_NAME, MASKS = "attributes.csv", "masks"


def _png(x: torch.Tensor, path: Path) -> None:
    """Save (C, H, W) in [-1, 1] as an 8-bit PNG."""
    a = to_uint8(x)
    arr = a[0].numpy() if a.shape[0] == 1 else a.permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def write_attribute_folder(splits: Mapping[str, LabelledImageDataset], out: str | Path, overwrite: bool = False) -> dict[str, int]:
    """Write every split of `splits` under `out` (see the module docstring); returns images per split.

    Attribute columns that merely repeat the class (MNIST's one-hot digits) are left out: the
    `label` column carries the class. Refuses to write into a non-empty folder unless `overwrite`.
    """
    out = Path(out)
    if not splits:
        raise ValueError("splits: nothing to write (expected at least one split)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"out_dir {out} is not empty; choose a new folder or pass --overwrite true")
    first = next(iter(splits.values()))
    names = [n for n in first.attribute_names if n not in first.classes]
    cols = [first.attribute_names.index(n) for n in names]
    rows, counts = [], {}
    for split, ds in splits.items():
        if list(ds.attribute_names) != list(first.attribute_names) or list(ds.classes) != list(first.classes):
            raise ValueError(f"splits[{split!r}]: attributes/classes differ from the first split's; all splits must share them")
        width = len(str(max(len(ds) - 1, 0)))
        for i in range(len(ds)):
            item = ds[i]
            rel = Path(split) / f"{i:0{width}d}.png"
            _png(item["image"], out / rel)
            mask = item.get("marker_mask")
            if mask is not None and bool(mask.any()):
                _png(mask * 2 - 1, out / MASKS / rel)
            label = int(ds.labels[i])
            values = ["" if math.isnan(float(v)) else str(int(v)) for v in ds.attributes[i, cols].tolist()]
            rows.append([rel.as_posix(), ds.classes[label] if label >= 0 and ds.classes else "", *values])
        counts[split] = len(ds)
    (out / MASKS).mkdir(parents=True, exist_ok=True)  # present even when no image has a marker
    with open(out / CSV_NAME, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "label", *names])
        writer.writerows(rows)
    return counts
