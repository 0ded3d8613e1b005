"""ProtoPNet-style projection: for each prototype, the k real training patches closest to it.

A generation-free view of what a prototype means: exact receptive-field boxes of the argmin
cells, for any encoder (recursion for conv layouts, measured for timm backbones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patronus.pipeline import PatronusPipeline


@dataclass
class PatchHit:
    prototype: int
    image_index: int
    cell: tuple[int, int]
    distance: float
    box: tuple[int, int, int, int]  # top, left, bottom, right (end-exclusive)


def top_patches(pipe: PatronusPipeline, distances: torch.Tensor, where: torch.Tensor, k: int = 5) -> list[list[PatchHit]]:
    """Per prototype, the k (image, cell) pairs with the smallest distance, at most one per image,
    from `pipe.encode(images)`'s `distances` and `where` (N, K)."""
    if k < 1:
        raise ValueError(f"k={k}; expected at least 1 patch per prototype")
    enc = pipe.model.encoder
    _, w = enc.feature_shape()
    rf = enc.receptive_field()
    hits = []
    for j in range(distances.shape[1]):
        order = distances[:, j].argsort()[:k]
        row = []
        for n in order.tolist():
            cell = divmod(int(where[n, j]), w)
            row.append(PatchHit(j, n, cell, float(distances[n, j]), rf.box(*cell)))
        hits.append(row)
    return hits


def nearest_patches(pipe: PatronusPipeline, images: torch.Tensor, k: int = 5) -> list[list[PatchHit]]:
    """Per prototype, the k (image, cell) pairs of `images` with the smallest distance, at most one per image."""
    acts = pipe.encode(images)
    return top_patches(pipe, acts.distances.cpu(), acts.where.cpu(), k=k)
