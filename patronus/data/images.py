"""Reading and checking image files: every failure names the file and what was expected."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.functional import pil_to_tensor, resize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MODES = {1: "L", 3: "RGB"}


def read_image(path: str | Path, channels: int, size: int | None = None, resize_to: int | None = None) -> torch.Tensor:
    """Image file -> float tensor (C, H, W) in [-1, 1].

    `size` demands an exact square size (error otherwise); `resize_to` resizes instead.
    RGB(A) files whose colour channels are identical count as grayscale (common for X-rays).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            img = im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot decode image (corrupt, truncated or not an image): {e}") from e
    if img.mode in ("RGBA", "LA", "P", "I;16", "I", "F", "1"):
        img = img.convert("RGB" if img.mode in ("RGBA", "P") else "L")
    x = pil_to_tensor(img)  # (C, H, W) uint8
    if channels == 1 and x.shape[0] == 3 and bool((x[0] == x[1]).all() and (x[1] == x[2]).all()):
        x = x[:1]
    if x.shape[0] != channels:
        raise ValueError(
            f"{path}: expected {channels} channel(s) ({MODES.get(channels, channels)}), got {x.shape[0]} ({img.mode})"
        )
    if resize_to is not None:
        x = resize(x, [resize_to, resize_to], antialias=True)
    elif size is not None and tuple(x.shape[1:]) != (size, size):
        raise ValueError(
            f"{path}: expected a {size}x{size} image, got {x.shape[2]}x{x.shape[1]} (width x height); "
            "resize it or pass the resize option"
        )
    return x.float() / 127.5 - 1


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    return files
