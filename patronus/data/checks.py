"""Row checks shared by the file-based loaders (folders, CelebA, CIFAR-10 JPEGs): a bad row
raises with its file and line named, or is dropped with one warning that counts them — never silently."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from PIL import Image, UnidentifiedImageError

from patronus.data.images import AS_STORED, MODES, Intensity, read_image, unscaled_range

OnError = Literal["raise", "skip"]
Verify = Literal["header", "decode"]  # how far every image file is checked up front

# Channels read_image produces for each PIL mode (it converts RGBA/P to RGB and LA/I/F/1 to L).
MODE_CHANNELS = {
    "1": 1,
    "L": 1,
    "LA": 1,
    "La": 1,
    "I": 1,
    "I;16": 1,
    "I;16B": 1,
    "I;16L": 1,
    "I;16N": 1,
    "F": 1,
    "P": 3,
    "RGB": 3,
    "RGBA": 3,
    "YCbCr": 3,
    "CMYK": 3,
}


@dataclass
class Problem:
    """One bad row: the exception type it raises under on_error="raise" and a message naming it."""

    kind: type[Exception]
    message: str


def check_on_error(on_error: str, verify: str = "header") -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}; expected 'raise' or 'skip'")
    if verify not in ("header", "decode"):
        raise ValueError(f"verify={verify!r}; expected 'header' (fast) or 'decode' (every image read in full)")


def image_problem(path: Path, channels: int, verify: Verify = "header", intensity: Intensity = AS_STORED) -> Optional[str]:
    """Why `path` cannot be read as a `channels`-channel image: from its header, or (verify="decode")
    by reading it in full as training will, which also finds truncated bodies, NaN pixels and values
    above the stated bit depth."""
    why = header_problem(path, channels)
    if why or verify == "header":
        return why
    try:
        read_image(path, channels, intensity=intensity)
    except (ValueError, OSError) as e:
        return str(e)
    return None


def header_problem(path: Path, channels: int) -> Optional[str]:
    """Why `path` cannot be read as a `channels`-channel image, from its header only (fast: no decode).

    Catches missing, empty, non-image and grayscale-where-RGB-expected files up front; a truncated
    body is only found when the image is decoded, and read_image's error then names the file.
    An RGB file may still be a valid 1-channel image (grey stored as RGB), so that is left to read_image.
    """
    try:
        with Image.open(path) as im:
            mode = im.mode
    except FileNotFoundError:
        return f"{path}: image file does not exist"
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        return f"{path}: cannot open image (empty, corrupt or not an image): {e}"
    got = MODE_CHANNELS.get(mode)
    if got is None or (channels == 3 and got == 1):
        return f"{path}: expected {channels} channel(s) ({MODES.get(channels, channels)}), got mode {mode}"
    return None


def warn_if_few_bits_used(files: Sequence[Path], intensity: Intensity, what: str, sample: int = 16) -> None:
    """Warn ONCE when deep integer images without sBIT (and no bit_depth stated) use far fewer bits
    than their type: 12-bit X-rays in 16-bit PNGs would otherwise train nearly black, silently.
    Up to `sample` files spread over the dataset are looked at; only 16/32-bit ones are decoded."""
    if intensity.bit_depth is not None or not files:
        return
    picked = [files[i * len(files) // min(sample, len(files))] for i in range(min(sample, len(files)))]
    found: list[tuple[int, int]] = []
    for f in picked:
        try:
            r = unscaled_range(f)
        except (OSError, SyntaxError, ValueError):
            continue  # unreadable files are the up-front checks' business
        if r is not None:
            found.append(r)
    if not found:
        return
    bits = max(b for b, _ in found)
    top = max(t for _, t in found)
    if top >= 2 ** (bits - 2):  # at least the top two bits are used somewhere: plausibly full-range data
        return
    guess = max(8, top.bit_length() + top.bit_length() % 2)  # 12-bit and 14-bit are the usual DICOM depths
    warnings.warn(
        f"{what}: the {len(found)} {bits}-bit image(s) checked have no sBIT chunk and reach at most {top} of "
        f"{2**bits - 1}, so they would train nearly black; if they hold {guess}-bit data (a DICOM export, e.g. an "
        f"X-ray), set bit_depth: {guess} in data.options (then {2**guess - 1} is white), and invert: true for "
        f"MONOCHROME1; bit_depth: {bits} keeps the full range and silences this warning",
        UserWarning,
        stacklevel=3,
    )


def resolve_problems(problems: Sequence[Problem], on_error: OnError, what: str, total: int, unit: str = "rows", shown: int = 5) -> None:
    """Raise the first problem (saying how many more there are), or warn ONCE about all dropped rows."""
    if not problems:
        return
    more = len(problems) - 1
    if on_error == "skip" and total and len(problems) >= total:
        raise problems[0].kind(f"{what}: all {total} {unit} are bad, nothing is left to use; first: {problems[0].message}")
    if on_error == "raise":
        hint = f" (and {more} more bad row(s); on_error='skip' drops them with a warning)" if more else ""
        raise problems[0].kind(problems[0].message + hint)
    listed = "; ".join(p.message for p in problems[:shown])
    warnings.warn(
        f"{what}: skipped {len(problems)} of {total} {unit} (on_error='skip'); first {min(shown, len(problems))}: {listed}",
        UserWarning,
        stacklevel=3,
    )
