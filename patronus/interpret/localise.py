"""Edit-and-localise: raise prototype J, decode, and box where J now fires (Patronus Fig. 3, any encoder).

For each prototype: invert the images (fully, or only `partial_steps` of the DDIM steps for
partial-noise editing), set s_J to its dataset max, decode from the same latent, re-encode, and
keep the image where s_J rose most; the box is the exact receptive field of its argmin cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torchvision.utils import draw_bounding_boxes, make_grid

from patronus.diffusion import ddim_invert, ddim_sample
from patronus.interpret.projection import to_uint8_rgb
from patronus.models.patronus import PatronusModel


@dataclass
class Localisation:
    prototype: int
    image_index: int
    rise: float  # s_J(edited decode) − s_J(plain decode) for the chosen image
    cell: tuple[int, int]
    box: tuple[int, int, int, int]  # top, left, bottom, right (end-exclusive)


@dataclass
class EditOutcome:
    """Every prototype raised in every image: what edit-and-localise and consistency both need."""

    prototypes: list[int]
    plain: torch.Tensor  # (B, C, H, W) decodes under the images' own s
    s_plain: torch.Tensor  # (B, K)
    edited: torch.Tensor  # (P, B, C, H, W) decodes with s_J raised
    rise: torch.Tensor  # (P, B) s_J(edited) − s_J(plain)
    cells: torch.Tensor  # (P, B, 2) argmin cell (h, w) of prototype J in each edited image


@torch.no_grad()
def edit_each_prototype(
    model: PatronusModel,
    x0: torch.Tensor,
    prototypes: Sequence[int],
    s_max: torch.Tensor,
    steps: int = 50,
    partial_steps: Optional[int] = None,
) -> EditOutcome:
    """Invert x0 (fully, or only `partial_steps` of the `steps` DDIM steps, from t=0 upwards),
    then for each J decode from the same latent with s_J = s_max[J] and find where J fires.

    Fewer inverted steps keep more of the original image (the emergence analysis says how many
    steps back a concept needs).
    """
    enc = model.encoder
    s = model.encode(x0)
    k = partial_steps if partial_steps is not None else steps
    if not 0 < k <= steps:
        raise ValueError(f"partial_steps={partial_steps}; expected 1..{steps}")
    z = ddim_invert(model, x0, s, steps, stop_step=k)
    start = steps - k
    plain = ddim_sample(model, z, s, steps, start_step=start, clip=False)
    s_plain = model.encode(plain)
    _, w = enc.feature_shape()
    edited, rises, cells = [], [], []
    for j in prototypes:
        s_edit = s.clone()
        s_edit[:, j] = s_max[j].to(s.device)
        img = ddim_sample(model, z, s_edit, steps, start_step=start, clip=False)
        s_after, where = enc.encode(img)
        edited.append(img)
        rises.append(s_after[:, j] - s_plain[:, j])
        cells.append(torch.stack([where[:, j] // w, where[:, j] % w], 1))
    p = len(prototypes)
    return EditOutcome(
        list(prototypes), plain, s_plain,
        torch.stack(edited) if p else plain[None, :0], torch.stack(rises) if p else s[:0].T,
        torch.stack(cells) if p else torch.zeros(0, len(x0), 2, dtype=torch.long),
    )


@torch.no_grad()
def edit_and_localise(
    model: PatronusModel,
    x0: torch.Tensor,
    prototypes: Sequence[int],
    s_max: torch.Tensor,
    steps: int = 50,
    partial_steps: Optional[int] = None,
) -> tuple[list[Localisation], torch.Tensor, torch.Tensor]:
    """Per prototype, the image where raising J raised s_J most and the RF box of J's argmin cell there.

    Returns the localisations, the plain decodes (B, C, H, W) and the chosen edited images (P, C, H, W).
    """
    out = edit_each_prototype(model, x0, prototypes, s_max, steps, partial_steps)
    rf = model.encoder.receptive_field()
    found, chosen = [], []
    for i, j in enumerate(out.prototypes):
        n = int(out.rise[i].argmax())
        cell = tuple(out.cells[i, n].tolist())
        found.append(Localisation(j, n, float(out.rise[i, n]), cell, rf.box(*cell)))
        chosen.append(out.edited[i, n])
    return found, out.plain, torch.stack(chosen) if chosen else out.plain[:0]


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
