"""Edit-and-localise: raise prototype J, decode, and box where J now fires (Patronus Fig. 3, any encoder).

For each prototype: invert the images (fully, or only `inverted_steps` of the DDIM steps for
partial-noise editing), set s_J to a high level (the CLI: its dataset q99), decode from the same latent, re-encode, and
keep the image where s_J rose most; the box is the exact receptive field of its argmin cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from patronus.edits import Edit
from patronus.pipeline import PatronusPipeline


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


def edit_each_prototype(
    pipe: PatronusPipeline,
    x0: torch.Tensor,
    prototypes: Sequence[int],
    s_target: torch.Tensor,
    steps: int = 50,
    inverted_steps: Optional[int] = None,
) -> EditOutcome:
    """Invert x0 (fully, or only `inverted_steps` of the `steps` DDIM steps, from t=0 upwards),
    then for each J decode from the same latent with s_J = s_target[J] (K,) and find where J fires.

    Fewer inverted steps keep more of the original image (the emergence analysis says how many
    steps back a concept needs).
    """
    # alone: where J acts by itself, not where the prototypes that co-vary with it act
    res = pipe.edit(x0, [[Edit(j, "set", s_target[j])] for j in prototypes], steps, inverted_steps, coupling="alone")
    s_plain = pipe.encode(res.reconstruction).s
    _, w = pipe.model.encoder.feature_shape()
    rises, cells = [], []
    for i, j in enumerate(prototypes):
        after = pipe.encode(res.images[i])
        rises.append(after.s[:, j] - s_plain[:, j])
        cells.append(torch.stack([after.where[:, j] // w, after.where[:, j] % w], 1))
    p = len(prototypes)
    return EditOutcome(
        list(prototypes),
        res.reconstruction,
        s_plain,
        res.images,
        torch.stack(rises) if p else s_plain[:0].T,
        torch.stack(cells) if p else torch.zeros(0, len(x0), 2, dtype=torch.long),
    )


def edit_and_localise(
    pipe: PatronusPipeline,
    x0: torch.Tensor,
    prototypes: Sequence[int],
    s_target: torch.Tensor,
    steps: int = 50,
    inverted_steps: Optional[int] = None,
) -> tuple[list[Localisation], torch.Tensor, torch.Tensor]:
    """Per prototype, the image where raising J raised s_J most and the RF box of J's argmin cell there.

    Returns the localisations, the plain decodes (B, C, H, W) and the chosen edited images (P, C, H, W).
    """
    out = edit_each_prototype(pipe, x0, prototypes, s_target, steps, inverted_steps)
    rf = pipe.model.encoder.receptive_field()
    found, chosen = [], []
    for i, j in enumerate(out.prototypes):
        n = int(out.rise[i].argmax())
        cell = tuple(out.cells[i, n].tolist())
        found.append(Localisation(j, n, float(out.rise[i, n]), cell, rf.box(*cell)))
        chosen.append(out.edited[i, n])
    return found, out.plain, torch.stack(chosen) if chosen else out.plain[:0]
