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


@torch.no_grad()
def edit_and_localise(
    model: PatronusModel,
    x0: torch.Tensor,
    prototypes: Sequence[int],
    s_max: torch.Tensor,
    steps: int = 50,
    partial_steps: Optional[int] = None,
) -> tuple[list[Localisation], torch.Tensor, torch.Tensor]:
    """Returns the localisations, the plain decodes (B, C, H, W) and the chosen edited images (J, C, H, W).

    `partial_steps` inverts only that many of the `steps` DDIM steps (from t=0 upwards) and edits
    from there: fewer steps keep more of the original image (emergence analysis says how many a
    concept needs).
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
    rf = enc.receptive_field()
    found, chosen = [], []
    for j in prototypes:
        s_edit = s.clone()
        s_edit[:, j] = s_max[j].to(s.device)
        edited = ddim_sample(model, z, s_edit, steps, start_step=start, clip=False)
        s_after, where = enc.encode(edited)
        rise = s_after[:, j] - s_plain[:, j]
        n = int(rise.argmax())
        cell = divmod(int(where[n, j]), w)
        found.append(Localisation(j, n, float(rise[n]), cell, rf.box(*cell)))
        chosen.append(edited[n])
    return found, plain, torch.stack(chosen) if chosen else plain[:0]


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
