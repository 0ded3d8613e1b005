"""MedMNIST v2 `.npz` files -> in-memory datasets (the images are small: decode and resize once).

Layout (MedMNIST's own convention, also what the `medmnist` package writes):
`ROOT/<name>.npz` for 28 px, `ROOT/<name>_<size>.npz` for the MedMNIST+ sizes 64/128/224, with
keys `{train,val,test}_images` ((N, H, W) grayscale or (N, H, W, 3) RGB, uint8) and
`{train,val,test}_labels` ((N, 1) class index, or (N, L) 0/1 findings for multi-label ChestMNIST).
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

from patronus.data.datasets import TensorImageDataset, to_model_range

SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)
DOWNLOAD_PAGE = "https://zenodo.org/records/10519652"  # MedMNIST+ (v3): all 2D sets at 28/64/128/224 px

# Official label names (medmnist's INFO[name]["label"], in index order) for the 2D sets.
ORGAN = [
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
]
LABEL_NAMES: dict[str, list[str]] = {
    "pathmnist": [
        "adipose",
        "background",
        "debris",
        "lymphocytes",
        "mucus",
        "smooth muscle",
        "normal colon mucosa",
        "cancer-associated stroma",
        "colorectal adenocarcinoma epithelium",
    ],
    "chestmnist": [
        "atelectasis",
        "cardiomegaly",
        "effusion",
        "infiltration",
        "mass",
        "nodule",
        "pneumonia",
        "pneumothorax",
        "consolidation",
        "edema",
        "emphysema",
        "fibrosis",
        "pleural",
        "hernia",
    ],
    "dermamnist": [
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    ],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "retinamnist": ["0", "1", "2", "3", "4"],  # diabetic-retinopathy grade (ordinal)
    "breastmnist": ["malignant", "normal, benign"],
    "bloodmnist": [
        "basophil",
        "eosinophil",
        "erythroblast",
        "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ],
    "tissuemnist": [
        "Collecting Duct, Connecting Tubule",
        "Distal Convoluted Tubule",
        "Glomerular endothelial cells",
        "Interstitial endothelial cells",
        "Leukocytes",
        "Podocytes",
        "Proximal Tubule Segments",
        "Thick Ascending Limb",
    ],
    "organamnist": ORGAN,
    "organcmnist": ORGAN,
    "organsmnist": ORGAN,
}
MULTI_LABEL = {"chestmnist"}  # (N, 14) binary findings instead of one class index
RESIZE_CHUNK = 2048  # images resized per step: bounds the float copy for the large sets


def npz_name(name: str, size: int) -> str:
    """MedMNIST's file name: `<name>.npz` at 28 px, `<name>_<size>.npz` otherwise."""
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def _fetch(root: Path, name: str, split: str, size: int) -> None:
    """Download through the `medmnist` package (it checks the official MD5)."""
    try:
        import medmnist
    except ImportError as e:
        raise ImportError(
            f"download=true for MedMNIST needs the `medmnist` package (pip install medmnist), which is not installed; "
            f"or download {npz_name(name, size)} yourself from {DOWNLOAD_PAGE} into {root}"
        ) from e
    info = getattr(medmnist, "INFO", {}).get(name)
    if info is None:
        raise ValueError(f"the medmnist package does not know the set {name!r}; cannot download {npz_name(name, size)}")
    root.mkdir(parents=True, exist_ok=True)
    kwargs = {} if size == 28 else {"size": size}  # medmnist < 3 has no `size` and only 28 px
    getattr(medmnist, info["python_class"])(split=split, root=str(root), download=True, **kwargs)


def _load_arrays(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """This split's image and label arrays, with errors that name the file and the key."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read it as a .npz archive (corrupt or truncated?): {e}") from e
    with archive:
        arrays = []
        for key in (f"{split}_images", f"{split}_labels"):
            if key not in archive.files:
                raise KeyError(
                    f"{path}: no array {key!r} (it has {sorted(archive.files)}); MedMNIST's npz convention has "
                    "train_images, train_labels, val_images, val_labels, test_images, test_labels"
                )
            try:
                arrays.append(archive[key])
            except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
                raise ValueError(f"{path}: array {key!r} cannot be read (corrupt or truncated?): {e}") from e
    return arrays[0], arrays[1]


def _as_nhwc(images: np.ndarray, path: Path, key: str, name: str, size: int) -> np.ndarray:
    """(N, H, W) or (N, H, W, 1|3) uint8 -> (N, H, W, C), checked against the requested size."""
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: {key} has dtype {images.dtype}; MedMNIST images are uint8")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"{path}: {key} has shape {images.shape}; expected (N, H, W) grayscale or (N, H, W, 3) RGB "
            "(the 3D MedMNIST volumes are not images)"
        )
    if images.shape[1:3] != (size, size):
        raise ValueError(
            f"{path}: {key} holds {images.shape[2]}x{images.shape[1]} images, but size={size} was requested and "
            f"MedMNIST's {npz_name(name, size)} holds {size}x{size} images; set size to match the file"
        )
    return images


def _convert_channels(images: np.ndarray, channels: Optional[int], path: Path, key: str) -> np.ndarray:
    """Match the requested channel count: gray -> RGB by repetition; RGB -> gray only when it is gray already."""
    have = images.shape[-1]
    if channels is None or channels == have:
        return images
    if channels not in (1, 3):
        raise ValueError(f"channels={channels}; MedMNIST images have 1 (grayscale) or 3 (RGB) channels")
    if channels == 3:
        return np.repeat(images, 3, axis=-1)
    if (images[..., :1] == images).all():
        return images[..., :1]
    raise ValueError(
        f"{path}: {key} holds RGB (colour) images but channels=1 was requested; use channels=3 "
        "(data.channels=3 and model.net.in_channels=3) for this set"
    )


def _label_table(
    labels: np.ndarray, name: str, path: Path, key: str, n_images: int, on_error: Literal["raise", "skip"]
) -> tuple[np.ndarray, list[str], bool, np.ndarray]:
    """Labels -> (int table (N, L), names, multi-label?, rows to keep); bad rows raise or are dropped with one warning."""
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2:
        raise ValueError(f"{path}: {key} has shape {labels.shape}; expected (N, 1) class indices or (N, L) 0/1 findings")
    if len(labels) != n_images:
        raise ValueError(f"{path}: {n_images} {key.replace('labels', 'images')} but {len(labels)} {key}")
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise ValueError(f"{path}: {key} has dtype {labels.dtype}; expected integer labels")
    known = LABEL_NAMES.get(name)
    multi = name in MULTI_LABEL if known is not None else labels.shape[1] > 1
    if multi:
        names = known or [f"class_{i}" for i in range(labels.shape[1])]
        if labels.shape[1] != len(names):
            raise ValueError(f"{path}: {key} has {labels.shape[1]} columns; {name} has {len(names)} findings {names}")
        bad = ~np.isin(labels, (0, 1)).all(axis=1)
        expected = "0 or 1 in every column"
    else:
        if labels.shape[1] != 1:
            raise ValueError(f"{path}: {key} has {labels.shape[1]} columns; {name} is single-label, expected (N, 1)")
        ok = labels >= 0
        if labels.dtype.kind == "f":  # float labels must still be whole numbers
            ok &= np.isfinite(labels) & (labels == np.round(labels))
        if known is not None:
            ok &= labels < len(known)
        bad = ~ok[:, 0]
        good_values = labels[~bad, 0].astype(np.int64)
        names = known or [f"class_{i}" for i in range(int(good_values.max()) + 1 if len(good_values) else 0)]
        expected = f"a class index 0..{len(names) - 1}" if known is not None else "a class index >= 0"
    keep = ~bad
    if bad.all() and len(bad):
        raise ValueError(f"{path}: all {len(labels)} rows of {key} are bad (not {expected}); nothing is left to use")
    if bad.any():
        rows = np.flatnonzero(bad)
        shown = "; ".join(f"row {r}: {labels[r].tolist()}" for r in rows[:5])
        more = "; ..." if len(rows) > 5 else ""
        message = f"{path}: {len(rows)} of {len(labels)} rows of {key} are not {expected} ({shown}{more})"
        if on_error == "raise":
            raise ValueError(message + "; pass on_error='skip' to drop them")
        warnings.warn(f"skipped {message}", stacklevel=3)
    return labels[keep].astype(np.int64), names, multi, keep


def medmnist(
    root: str,
    split: str,
    image_size: int,
    download: bool = False,
    *,
    name: str = "pneumoniamnist",
    size: int = 28,
    channels: Optional[int] = None,
    on_error: Literal["raise", "skip"] = "raise",
) -> TensorImageDataset:
    """A MedMNIST 2D set from `ROOT/<name>[_<size>].npz`, images in memory at `image_size`.

    Single-label sets: `labels` = class index, attributes = one-hot over the official label names.
    Multi-label ChestMNIST: `labels` = -1, attributes = the 14 findings (0/1).
    `channels` None keeps the file's channels; 3 repeats grayscale; 1 on a colour set is an error.
    `on_error="skip"` drops rows with invalid labels (one warning); "raise" stops at them.
    `download=true` fetches a missing file with the `medmnist` package (never replaces an existing file).
    """
    name = name.lower()
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; MedMNIST splits are {list(SPLITS)}")
    if size not in SIZES:
        raise ValueError(f"size={size}; MedMNIST files exist at {list(SIZES)} px")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}; expected 'raise' or 'skip'")
    folder = Path(root)
    path = folder / npz_name(name, size)
    if download and not path.is_file():
        _fetch(folder, name, split, size)
    if not path.is_file():
        present = sorted(p.name for p in folder.glob("*.npz")) if folder.is_dir() else []
        raise FileNotFoundError(
            f"{path} not found: expected MedMNIST's npz convention ROOT/<name>.npz (28 px) or ROOT/<name>_<size>.npz "
            f"(64/128/224 px), i.e. {npz_name(name, size)} in {folder}"
            + (f" (it holds {present})" if present else "")
            + f"; pass download=true (needs the medmnist package) or get it from {DOWNLOAD_PAGE}"
        )
    images, labels = _load_arrays(path, split)
    key = f"{split}_images"
    images = _as_nhwc(images, path, key, name, size)
    table, names, multi, keep = _label_table(labels, name, path, f"{split}_labels", len(images), on_error)
    images = _convert_channels(images[keep] if not keep.all() else images, channels, path, key)

    n, c = len(images), images.shape[-1]
    x = torch.empty(n, c, image_size, image_size)
    for start in range(0, n, RESIZE_CHUNK):  # chunked: bounds peak memory (a whole 224 px set as float is many GB)
        chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + RESIZE_CHUNK].transpose(0, 3, 1, 2)))
        x[start : start + len(chunk)] = to_model_range(chunk, image_size)
    if multi:
        y = torch.full((n,), -1, dtype=torch.long)
        return TensorImageDataset(x, y, names, torch.from_numpy(table).float(), classes=())
    y = torch.from_numpy(table[:, 0])
    return TensorImageDataset(x, y, names, F.one_hot(y, len(names)).float(), classes=names)
