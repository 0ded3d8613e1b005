"""Image grids with receptive-field boxes: where a prototype matched, or where an edit of it landed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torchvision.utils import draw_bounding_boxes, make_grid

from patronus.plots.images import to_uint8_rgb

if TYPE_CHECKING:
    from patronus.interpret.localise import EditOutcome, Localisation
    from patronus.interpret.projection import PatchHit
    from patronus.models.prototypes import ReceptiveField


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


def localisation_gallery(plain: torch.Tensor, edited: torch.Tensor, found: list[Localisation], scale: int = 3) -> torch.Tensor:
    """Pairs per prototype: the plain decode and the edited one with J's receptive-field box (uint8 grid)."""
    tiles = []
    for loc, img in zip(found, edited):
        top, left, bottom, right = loc.box
        box = torch.tensor([[left, top, right - 1, bottom - 1]])
        tiles.append(to_uint8_rgb(plain[loc.image_index]))
        tiles.append(draw_bounding_boxes(to_uint8_rgb(img), box, colors="red", width=1))
    big = torch.nn.functional.interpolate(torch.stack(tiles).float(), scale_factor=scale, mode="nearest")
    return make_grid(big, nrow=8, padding=2, pad_value=255).to(torch.uint8)


def consistency_grid(outcome: EditOutcome, rf: ReceptiveField, scale: int = 2) -> torch.Tensor:
    """One row per prototype: J raised in each image, its receptive-field box drawn (red: s_J rose; grey: it did not)."""
    tiles = []
    for i in range(len(outcome.prototypes)):
        for b in range(outcome.edited.shape[1]):
            top, left, bottom, right = rf.box(*outcome.cells[i, b].tolist())
            colour = "red" if outcome.rise[i, b] > 0 else "gray"
            img = to_uint8_rgb(outcome.edited[i, b].cpu())
            tiles.append(draw_bounding_boxes(img, torch.tensor([[left, top, right - 1, bottom - 1]]), colors=colour, width=1))
    big = torch.nn.functional.interpolate(torch.stack(tiles).float(), scale_factor=scale, mode="nearest")
    return make_grid(big, nrow=outcome.edited.shape[1], padding=2, pad_value=255).to(torch.uint8)
