"""Small torch helpers every layer shares: eval mode for a while, and images to and from uint8."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn


@contextmanager
def eval_mode(*modules: Optional[nn.Module]) -> Iterator[None]:
    """Eval mode for the `modules` (None entries are skipped) inside the block, each module's own
    train/eval flag restored afterwards, also on an error: inference on a live training network
    must not update BatchNorm statistics, and must leave the network training."""
    present = [m for m in modules if m is not None]
    was = [m.training for m in present]
    for m in present:
        m.eval()
    try:
        yield
    finally:
        for m, w in zip(present, was):
            m.train(w)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (any shape) -> uint8 [0, 255], rounded exactly as torchvision's `save_image`
    rounds, so a PNG written from the float images and a picture logged or scored from this tensor
    hold the same pixels."""
    unit = ((images.float() + 1) / 2).clamp(0, 1)
    return unit.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] images -> float in [-1, 1] (the inverse of `to_uint8` up to its rounding)."""
    return images.float() / 127.5 - 1
