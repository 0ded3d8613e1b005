"""Reading and checking image files: every failure names the file and what was expected.

Pixels are scaled by the range of their type, whatever the bit depth: 8-bit /255, 16-bit
/65535 (or by the significant bits a PNG declares in its sBIT chunk: a 12-bit DICOM export in a
16-bit PNG then spans [-1, 1] as the DICOM viewer shows it), 32-bit integers by their full range,
float images must already lie in [0, 1]. Nothing is clipped silently and NaN/inf pixels are errors.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.functional import pil_to_tensor, resize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MODES = {1: "L", 3: "RGB"}
HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # single-channel modes deeper than 8 bit
TIFF_BITS, TIFF_SAMPLE_FORMAT = 258, 339  # TIFF tags: BitsPerSample, SampleFormat (1 uint, 2 int, 3 float)


def png_significant_bits(path: Path) -> Optional[int]:
    """The grey sample's significant bits from a PNG's sBIT chunk (None without one). Read from the
    chunk headers before the image data, so it costs one short read."""
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            while True:
                head = fh.read(8)
                if len(head) < 8:
                    return None
                length, kind = struct.unpack(">I4s", head)
                if kind in (b"IDAT", b"IEND"):
                    return None
                data = fh.read(length)
                fh.seek(4, 1)  # CRC
                if kind == b"sBIT" and data:
                    return int(data[0])
    except OSError:
        return None


def _integer_range(img: Image.Image, path: Path, values: np.ndarray) -> tuple[float, float]:
    """(lowest, highest) value of the integer type a single-channel deep image is stored in."""
    if img.mode.startswith("I;16") or img.format == "PNG":  # PNG has no 32-bit samples: "I" from a PNG is 16-bit
        bits = png_significant_bits(path) if img.format == "PNG" else None
        bits = bits if bits and bits <= 16 else 16
        if int(values.max(initial=0)) >= 2**bits:  # an sBIT chunk that understates the data: trust the type
            bits = 16
        return 0.0, float(2**bits - 1)
    tags = getattr(img, "tag_v2", {}) or {}
    bits = tags.get(TIFF_BITS, 32)
    bits = int(bits[0] if isinstance(bits, (tuple, list)) else bits)
    signed = (tags.get(TIFF_SAMPLE_FORMAT, 1) in (2, (2,))) or int(values.min(initial=0)) < 0
    if signed:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def deep_to_unit(img: Image.Image, path: Path) -> torch.Tensor:
    """A 16-bit, 32-bit integer or float single-channel image -> float (1, H, W) in [0, 1]."""
    values = np.asarray(img)
    if img.mode == "F":
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            raise ValueError(f"{path}: {bad} pixel(s) are NaN or infinite; expected finite intensities")
        lo, hi = float(values.min(initial=0)), float(values.max(initial=0))
        if lo < 0 or hi > 1:
            raise ValueError(f"{path}: float pixels range over [{lo:.4g}, {hi:.4g}]; expected float images in [0, 1] "
                             "(save integer images as 8/16-bit instead, or rescale to [0, 1])")
        return torch.from_numpy(values.astype(np.float32))[None]
    lo, hi = _integer_range(img, path, values)
    x = (values.astype(np.float64) - lo) / (hi - lo)
    return torch.from_numpy(x.astype(np.float32))[None]


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
            img.format = im.format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: cannot decode image (corrupt, truncated or not an image): {e}") from e
    if img.mode in HIGH_DEPTH:
        x = deep_to_unit(img, path)  # (1, H, W) float in [0, 1]
        if channels == 3:
            x = x.expand(3, -1, -1)
        mode = img.mode
    else:
        if img.mode not in ("L", "RGB"):
            img = img.convert("L" if img.mode in ("LA", "1", "La") else "RGB")
        x = pil_to_tensor(img)  # (C, H, W) uint8
        mode = img.mode
        if channels == 1 and x.shape[0] == 3 and bool((x[0] == x[1]).all() and (x[1] == x[2]).all()):
            x = x[:1]
    if x.shape[0] != channels:
        raise ValueError(f"{path}: expected {channels} channel(s) ({MODES.get(channels, channels)}), got {x.shape[0]} ({mode})")
    if resize_to is not None:
        x = resize(x, [resize_to, resize_to], antialias=True)
    elif size is not None and tuple(x.shape[1:]) != (size, size):
        raise ValueError(
            f"{path}: expected a {size}x{size} image, got {x.shape[2]}x{x.shape[1]} (width x height); "
            "resize it or pass the resize option"
        )
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1
    return (x * 2 - 1).clamp(-1, 1)  # clamp: antialiased resizing overshoots at edges


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    return files
