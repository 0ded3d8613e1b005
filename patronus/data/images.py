"""Reading and checking image files: every failure names the file and what was expected.

Pixels are scaled by the range of their type, whatever the bit depth: 8-bit /255, 16-bit
/65535 (or by the significant bits a PNG declares in its sBIT chunk: a 12-bit DICOM export in a
16-bit PNG then spans [-1, 1] as the DICOM viewer shows it), 32-bit integers by their full range,
float images must already lie in [0, 1]. Nothing is clipped silently and NaN/inf pixels are errors.
What a file cannot say itself (12-bit values in a 16-bit PNG without sBIT, MONOCHROME1's inverted
grey) the dataset states explicitly with `Intensity`, so DICOM-derived X-rays train as they look.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.functional import pil_to_tensor, resize

from patronus.torch_utils import from_uint8

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


@dataclass(frozen=True)
class Intensity:
    """How to read grey values a file does not describe itself (DICOM exports), set per dataset.

    bit_depth: the bits actually stored in integer pixels (12: values 0..4095 span [-1, 1]; a
    larger value is an error naming the file); None = the file's own type, or a PNG's sBIT chunk.
    invert: MONOCHROME1 (high values dark): flipped, so bone is bright as in every other X-ray.
    """

    bit_depth: Optional[int] = None
    invert: bool = False

    def __post_init__(self) -> None:
        b = self.bit_depth
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 32):
            raise ValueError(
                f"bit_depth={b!r}; expected the bits stored per pixel, an integer 1..32 (e.g. 12 for a "
                "12-bit DICOM export in a 16-bit PNG), or null to scale by the file's type"
            )
        if not isinstance(self.invert, bool):
            raise ValueError(f"invert={self.invert!r}; expected true (MONOCHROME1: high values are dark) or false")


AS_STORED = Intensity()


def stored_type(img: Image.Image) -> tuple[int, bool]:
    """(bits, signed) of the integer type a single-channel deep image is stored in."""
    if img.mode.startswith("I;16") or img.format == "PNG":  # PNG has no 32-bit samples: "I" from a PNG is 16-bit
        return 16, False
    tags = getattr(img, "tag_v2", {}) or {}
    bits = tags.get(TIFF_BITS, 32)
    bits = int(bits[0] if isinstance(bits, (tuple, list)) else bits)
    return bits, tags.get(TIFF_SAMPLE_FORMAT, 1) in (2, (2,))


def _stated_top(path: Path, stored_bits: int, top_value: int, bit_depth: int) -> int:
    """2^bit_depth - 1, after checking that the file can hold and does hold `bit_depth`-bit values."""
    if bit_depth > stored_bits:
        raise ValueError(
            f"{path}: holds {stored_bits}-bit pixels, fewer than bit_depth={bit_depth}; expected "
            f"files of at least {bit_depth} bits (or leave bit_depth unset for {stored_bits}-bit files)"
        )
    top = 2**bit_depth - 1
    if top_value > top:
        raise ValueError(
            f"{path}: pixel value {top_value} is above {top}, the largest {bit_depth}-bit value "
            f"(bit_depth={bit_depth}); expected {bit_depth}-bit data: is bit_depth right for this file?"
        )
    return top


def _integer_range(img: Image.Image, path: Path, values: np.ndarray, bit_depth: Optional[int]) -> tuple[float, float]:
    """(lowest, highest) value the integer pixels of a single-channel deep image can take."""
    bits, signed = stored_type(img)
    lowest = int(values.min(initial=0))
    if bit_depth is not None:
        if signed or lowest < 0:
            raise ValueError(
                f"{path}: holds signed {bits}-bit pixels (down to {lowest}); bit_depth={bit_depth} "
                "describes unsigned data: leave bit_depth unset for this file"
            )
        return 0.0, float(_stated_top(path, bits, int(values.max(initial=0)), bit_depth))
    if signed or lowest < 0:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    if img.format == "PNG":
        sbit = png_significant_bits(path)
        if sbit and sbit < bits and int(values.max(initial=0)) < 2**sbit:  # an sBIT that understates the data: trust the type
            bits = sbit
    return 0.0, float(2**bits - 1)


def unscaled_range(path: Path) -> Optional[tuple[int, int]]:
    """(stored bits, highest pixel) of an unsigned deep integer image that only its type can scale
    (no sBIT chunk); None for any other image. Decodes deep images only, to spot 12-bit data in 16 bits."""
    with Image.open(path) as im:
        if im.mode not in HIGH_DEPTH or im.mode == "F":
            return None
        if im.format == "PNG" and png_significant_bits(path):
            return None
        im.load()
        bits, signed = stored_type(im)
        values = np.asarray(im)
    if signed or int(values.min(initial=0)) < 0:
        return None
    return bits, int(values.max(initial=0))


def deep_to_unit(img: Image.Image, path: Path, bit_depth: Optional[int] = None) -> torch.Tensor:
    """A 16-bit, 32-bit integer or float single-channel image -> float (1, H, W) in [0, 1]."""
    values = np.asarray(img)
    if img.mode == "F":
        if bit_depth is not None:
            raise ValueError(
                f"{path}: float pixels; bit_depth={bit_depth} describes integer data: expected "
                f"{bit_depth}-bit integer images (or leave bit_depth unset for float images in [0, 1])"
            )
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            raise ValueError(f"{path}: {bad} pixel(s) are NaN or infinite; expected finite intensities")
        lo, hi = float(values.min(initial=0)), float(values.max(initial=0))
        if lo < 0 or hi > 1:
            raise ValueError(
                f"{path}: float pixels range over [{lo:.4g}, {hi:.4g}]; expected float images in [0, 1] "
                "(save integer images as 8/16-bit instead, or rescale to [0, 1])"
            )
        return torch.from_numpy(values.astype(np.float32))[None]
    lo, hi = _integer_range(img, path, values, bit_depth)
    x = (values.astype(np.float64) - lo) / (hi - lo)
    return torch.from_numpy(x.astype(np.float32))[None]


def read_image(
    path: str | Path, channels: int, size: int | None = None, resize_to: int | None = None, intensity: Intensity = AS_STORED
) -> torch.Tensor:
    """Image file -> float tensor (C, H, W) in [-1, 1].

    `size` demands an exact square size (error otherwise); `resize_to` resizes instead.
    RGB(A) files whose colour channels are identical count as grayscale (common for X-rays).
    `intensity` states the stored bit depth and MONOCHROME1 inversion where the file cannot.
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
        x = deep_to_unit(img, path, intensity.bit_depth)  # (1, H, W) float in [0, 1]
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
        if intensity.bit_depth not in (None, 8):
            x = x.float() / _stated_top(path, 8, int(x.max()), intensity.bit_depth)  # (C, H, W) in [0, 1]
    if x.shape[0] != channels:
        raise ValueError(f"{path}: expected {channels} channel(s) ({MODES.get(channels, channels)}), got {x.shape[0]} ({mode})")
    if resize_to is not None:
        x = resize(x, [resize_to, resize_to], antialias=True)
    elif size is not None and tuple(x.shape[1:]) != (size, size):
        raise ValueError(
            f"{path}: expected a {size}x{size} image, got {x.shape[2]}x{x.shape[1]} (width x height); resize it or pass the resize option"
        )
    y = from_uint8(x) if x.dtype == torch.uint8 else (x * 2 - 1).clamp(-1, 1)  # clamp: antialiasing overshoots
    return -y if intensity.invert else y  # MONOCHROME1: 1 - x in [0, 1] is -y in [-1, 1]


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    return files
