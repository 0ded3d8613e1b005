"""Marker causality: do the marker prototypes draw and remove a planted marker?

On data with a planted marker and its masks: raise the marker prototype(s) jointly (to q99) on
unmarked images and lower them jointly (to q01) on marked ones, each from its inverted latent;
report the share of decodes where the marker is drawn / is gone, judged by the pixel rule of
`patronus.interpret.marker_rule` calibrated on these real images. The rates of the plain
reconstructions are reported beside them: an inverted latent can carry the marker's pixels itself.
Two references say what limits the edit (`MarkerReferences`):
  * swap: each marked image's latent decoded under the whole s of a real *unmarked* image of its
    class: the most any s can remove from that latent (where the marker stays in most such
    decodes, a removal rate near 0 is the latent's, not the prototype's);
  * fresh noise: the same raise / lower decoded from fresh x_T beside the same x_T under the
    unedited s: whether the generator reads the marker prototypes at all, no inversion involved.
Marker prototypes, when not given: `marker_prototypes_by_auroc` — every prototype whose
single-prototype AUROC for the marker attribute (oriented: firing *more* on marked images, since
raising it must draw the marker) is ≥ `MARKER_AUROC`, else the single best one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from patronus.edits import Edit, apply_edits
from patronus.interpret.marker_rule import MarkerDetector, MarkerRates, marker_detector, marker_rates, share
from patronus.interpret.quality import auroc_matrix
from patronus.pipeline import PatronusPipeline

MARKER_AUROC = 0.9  # a prototype with at least this AUROC for the marker attribute is a marker prototype
EDIT_BATCH = 64  # images per `pipe.edit` call


def marker_prototypes_by_auroc(s: torch.Tensor, marker: torch.Tensor, threshold: float = MARKER_AUROC) -> tuple[list[int], torch.Tensor]:
    """(prototypes, oriented AUROC (K,)): every prototype whose AUROC for the binary `marker`
    column (N,) — high activation ⇒ marked — is ≥ threshold, best first; the best one alone if
    none reaches it."""
    if marker.ndim != 1 or len(marker) != len(s):
        raise ValueError(f"marker: expected ({len(s)},) 0/1 values, got shape {tuple(marker.shape)}")
    known = marker[~marker.isnan()]
    if not (bool((known == 0).any()) and bool((known == 1).any())):
        raise ValueError("marker: needs both marked and unmarked images to rank prototypes")
    auc = auroc_matrix(s.cpu(), marker.float().cpu()[:, None], sign_free=False)[0]
    order = auc.nan_to_num(-1).argsort(descending=True).tolist()
    picked = [j for j in order if float(auc[j]) >= threshold]
    return (picked or order[:1]), auc


@dataclass
class MarkerReferences:
    """What bounds the edit, measured beside it (see the module docstring)."""

    removed_by_swap: float  # marked latents decoded under a real unmarked image's s (its class when known), marker gone
    drawn_from_noise: float  # fresh x_T decoded under the unmarked images' s with the marker prototypes raised
    drawn_from_noise_unedited: float  # the same x_T under their own s
    removed_from_noise: float  # fresh x_T under the marked images' s with the marker prototypes lowered, marker absent
    removed_from_noise_unedited: float  # the same x_T under their own s, marker absent

    def as_dict(self) -> dict[str, float]:
        return dict(vars(self))


def same_class_partners(labels: Optional[torch.Tensor], partner_labels: Optional[torch.Tensor], n: int, m: int) -> torch.Tensor:
    """(n,) an index into the m partners for each of n images: partners of the image's own class, taken
    in turn, where labels are known and the class has one; otherwise every partner in turn."""
    everyone = torch.arange(m)
    out = everyone[torch.arange(n) % m]
    if labels is None or partner_labels is None:
        return out
    for i in range(n):
        same = everyone[partner_labels == labels[i]]
        if len(same):
            out[i] = same[(labels[:i] == labels[i]).sum() % len(same)]
    return out


@dataclass
class MarkerEffect:
    prototypes: list[int]
    detector: MarkerDetector
    rates: MarkerRates
    unmarked: torch.Tensor  # (N, C, H, W) real
    unmarked_reconstruction: torch.Tensor
    raised: torch.Tensor  # (N, C, H, W) the marker prototypes raised
    marked: torch.Tensor  # (M, C, H, W) real
    marked_reconstruction: torch.Tensor
    lowered: torch.Tensor  # (M, C, H, W) the marker prototypes lowered
    s_raised: torch.Tensor  # (N, P) the marker prototypes re-encoded: reconstruction → raised, mean
    s_lowered: torch.Tensor  # (M, P)
    s_unmarked_reconstruction: torch.Tensor  # (N, P)
    s_marked_reconstruction: torch.Tensor  # (M, P)
    references: Optional[MarkerReferences] = None


def marker_effect(
    pipe: PatronusPipeline,
    unmarked: torch.Tensor,
    marked: torch.Tensor,
    masks: torch.Tensor,
    prototypes: Sequence[int],
    levels: Mapping[str, torch.Tensor],
    steps: int = 50,
    inverted_steps: Optional[int] = None,  # None = invert all the way to x_T
    edit_guidance: float = 1.0,  # 1 = no edit guidance: ε̂(x_t, t, s_edit) alone
    references: bool = True,  # False = no swap or fresh-noise references (`references` is None)
    unmarked_labels: Optional[torch.Tensor] = None,  # None = swap partners taken in turn, whatever their class
    marked_labels: Optional[torch.Tensor] = None,  # None = as for unmarked_labels
    seed: int = 0,
) -> MarkerEffect:
    """Joint edit of the marker prototypes from the inverted latents: all raised to q99 on the
    unmarked images, all lowered to q01 on the marked ones; judged by the midpoint rule calibrated
    on these real images (`marker_detector`). `references` also measures the swap ceiling and the
    same edits from fresh noise (`MarkerReferences`; labels pair each marked image with an unmarked
    one of its class for the swap)."""
    prototypes = list(prototypes)
    K = pipe.num_prototypes
    if not prototypes or any(not 0 <= j < K for j in prototypes):
        raise ValueError(f"marker_prototypes {prototypes}: expected one or more of 0..{K - 1}")
    detector = marker_detector(unmarked, marked, masks)
    edit_of = lambda level: [Edit(j, "set", level) for j in prototypes]  # noqa: E731

    def run(x: torch.Tensor, level: str, partner_s: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
        """(reconstructions, edited, the images' own s, their latents decoded under partner_s when given)."""
        rec, out, own_s, swapped = [], [], [], []
        for i in range(0, len(x), EDIT_BATCH):
            # alone: the marker prototypes' own effect, not that of the class prototypes the marker co-varies with
            res = pipe.edit(
                x[i : i + EDIT_BATCH], [edit_of(level)], steps, inverted_steps, levels, guidance=edit_guidance, coupling="alone"
            )
            rec.append(res.reconstruction.cpu())
            out.append(res.images[0].cpu())
            own_s.append(res.s)
            if partner_s is not None:
                swapped.append(
                    pipe.decode_edited(
                        res.latent, partner_s[i : i + EDIT_BATCH], res.s, steps, inverted_steps=res.inverted_steps, guidance=edit_guidance
                    ).cpu()
                )
        return torch.cat(rec), torch.cat(out), torch.cat(own_s), torch.cat(swapped) if partner_s is not None else torch.empty(0)

    def from_noise(own_s: torch.Tensor, level: str, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_T decoded under s, the same x_T under the edited s) for fresh seeded x_T."""
        plain, edited = [], []
        for i in range(0, len(own_s), EDIT_BATCH):
            s = own_s[i : i + EDIT_BATCH]
            x_T = pipe.noise((len(s), *pipe.image_shape()), seed=seed + offset + i)
            plain.append(pipe.denoise(x_T, s, steps).cpu())
            edited.append(
                pipe.decode_edited(x_T, apply_edits(s, edit_of(level), levels), s, steps, guidance=edit_guidance, clip=True).cpu()
            )
        return torch.cat(plain), torch.cat(edited)

    # 1. Raise the marker prototypes on the unmarked images (x0 -> x_T under s, decode under s_J := q99).
    un_rec, raised, s_unmarked, _ = run(unmarked, "q99")
    # 2. Lower them on the marked ones (s_J := q01); with references, also decode each marked latent
    #    under the whole s of its partner: a real unmarked image of its class.
    partners = s_unmarked[same_class_partners(marked_labels, unmarked_labels, len(marked), len(unmarked)).to(s_unmarked.device)]
    mk_rec, lowered, s_marked, swapped = run(marked, "q01", partners if references else None)
    # 3. Judge every decode with the pixel rule.
    rates = marker_rates(detector, raised, lowered, un_rec, mk_rec)
    refs = None
    if references:
        # 4. The same edits from fresh x_T, beside the same x_T under the unedited s.
        un_plain, un_raised = from_noise(s_unmarked, "q99", 0)
        mk_plain, mk_lowered = from_noise(s_marked, "q01", len(unmarked))
        refs = MarkerReferences(
            share(~detector.present(swapped)),
            share(detector.present(un_raised)),
            share(detector.present(un_plain)),
            share(~detector.present(mk_lowered)),
            share(~detector.present(mk_plain)),
        )
    enc = lambda x: pipe.encode(x).s.cpu()[:, prototypes]  # noqa: E731
    return MarkerEffect(
        prototypes,
        detector,
        rates,
        unmarked.cpu(),
        un_rec,
        raised,
        marked.cpu(),
        mk_rec,
        lowered,
        enc(raised),
        enc(lowered),
        enc(un_rec),
        enc(mk_rec),
        refs,
    )
