"""Images to pixels: [-1, 1] tensors to [0, 1] / uint8, torchvision grids, and PNG files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from einops import rearrange
from torchvision.io import write_png
from torchvision.utils import make_grid, save_image

from patronus.torch_utils import to_uint8


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] for image files and loggers."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def unit_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] float -> uint8 exactly as torchvision's `save_image` rounds it, so a picture logged
    from the tensor and the PNG written from it hold the same pixels."""
    return x.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (C, H, W) -> uint8 RGB (`to_uint8`), for drawing."""
    x = to_uint8(x)
    return x.expand(3, -1, -1) if x.shape[0] == 1 else x


def display_image(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) in [-1, 1] -> (H, W, 3) or (H, W) in [0, 1] for imshow."""
    x = to_unit(image.detach().cpu())
    return x[0] if x.shape[0] == 1 else rearrange(x, "c h w -> h w c")


def reference_grid(refs: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """Row 1 the references, row 2 their samples; uint8 (3, H, W), like every figure here."""
    return unit_to_uint8(make_grid(to_unit(torch.cat([refs.cpu(), samples.cpu()])), nrow=len(refs), padding=1))


def save_rows(rows: Sequence[torch.Tensor], path: Path) -> Path:
    """Rows of equally many images -> one PNG grid."""
    batch = torch.cat([r.cpu() for r in rows])
    save_image(make_grid(to_unit(batch), nrow=len(rows[0]), padding=1, pad_value=1.0), path)
    return path


def save_png(image: torch.Tensor, path: Path) -> Path:
    """A uint8 (3, H, W) image (a grid or a rendered figure) as a PNG file."""
    write_png(image.cpu(), str(path))
    return Path(path)
