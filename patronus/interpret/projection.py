"""ProtoPNet-style projection: for each prototype, the k real training patches closest to it.

A generation-free view of what a prototype means: exact receptive-field boxes of the argmin
cells, for any encoder (recursion for conv layouts, measured for timm backbones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.utils import draw_bounding_boxes, make_grid

from patronus.models.patronus import PatronusModel


@dataclass
class PatchHit:
    prototype: int
    image_index: int
    cell: tuple[int, int]
    distance: float
    box: tuple[int, int, int, int]  # top, left, bottom, right (end-exclusive)


@torch.no_grad()
def min_distances(model: PatronusModel, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and prototype the smallest distance and its flat cell index, (N, K) each on the CPU.

    One pass over the images serves both the projection and the activations
    (`encoder.activations_from_distances(dmin)` is s).
    """
    enc = model.encoder
    dev = next(model.parameters()).device
    dmins, wheres = [], []
    for i in range(0, len(images), batch_size):
        d = enc.distance_maps(images[i : i + batch_size].to(dev)).flatten(2)  # (B, K, H'*W')
        dmin, where = d.min(dim=2)
        dmins.append(dmin.cpu())
        wheres.append(where.cpu())
    return torch.cat(dmins), torch.cat(wheres)


def top_patches(model: PatronusModel, dmin: torch.Tensor, where: torch.Tensor, k: int = 5) -> list[list[PatchHit]]:
    """Per prototype, the k (image, cell) pairs with the smallest distance, from `min_distances`."""
    enc = model.encoder
    _, w = enc.feature_shape()
    rf = enc.receptive_field()
    hits = []
    for j in range(dmin.shape[1]):
        order = dmin[:, j].argsort()[:k]
        row = []
        for n in order.tolist():
            cell = divmod(int(where[n, j]), w)
            row.append(PatchHit(j, n, cell, float(dmin[n, j]), rf.box(*cell)))
        hits.append(row)
    return hits


def nearest_patches(model: PatronusModel, images: torch.Tensor, k: int = 5, batch_size: int = 256) -> list[list[PatchHit]]:
    """Per prototype, the k (image, cell) pairs with the smallest distance, at most one per image."""
    return top_patches(model, *min_distances(model, images, batch_size), k=k)


def to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (C, H, W) -> uint8 RGB, for drawing."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(3, -1, -1) if x.shape[0] == 1 else x


def patch_gallery(images: torch.Tensor, hits: list[list[PatchHit]], scale: int = 2) -> torch.Tensor:
    """One row per prototype: each hit's full image with its receptive-field box drawn (uint8 grid)."""
    tiles = []
    for row in hits:
        for h in row:
            img = to_uint8_rgb(images[h.image_index])
            top, left, bottom, right = h.box
            boxed = draw_bounding_boxes(img, torch.tensor([[left, top, right - 1, bottom - 1]]), colors="red", width=1)
            tiles.append(torch.nn.functional.interpolate(boxed[None].float(), scale_factor=scale, mode="nearest")[0])
    return make_grid(torch.stack(tiles), nrow=len(hits[0]), padding=2, pad_value=255).to(torch.uint8)
