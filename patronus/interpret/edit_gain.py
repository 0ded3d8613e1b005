"""Edit gain: when an edit sets s_J, how far does the decode's re-encoded s_J move towards it?

Invert the images (fully, or `inverted_steps` of the DDIM steps), then decode the same latent with
s_J set to its q99 (raise) or q01 (lower), one prototype at a time:
    gain_J(i) = (s_J(edited decode_i) − s_J(reconstruction_i)) / (target_J − s_J(reconstruction_i))
1 = the decode reached the requested value, 0 = no change, < 0 = moved the wrong way (the sign
convention makes a working lower edit positive too). gain_J = the mean over images i whose gap
|target_J − s_J(reconstruction_i)| is at least `min_gap` · (q99_J − q01_J) (an image already at
the target has no gain to measure); `pooled_gain` = Σ_i Δ_i / Σ_i gap_i over the same images.
Also the mean absolute pixel change |edited − reconstruction| on the [-1, 1] scale and the mean
|Δs_k| of the prototypes k ≠ J that were not asked to move.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from patronus.edits import Edit
from patronus.pipeline import PatronusPipeline


@dataclass
class DirectionGain:
    """One direction (raise to q99 or lower to q01), per edited prototype."""

    target: torch.Tensor  # (P,) the requested value of s_J
    images: torch.Tensor  # (P, B, C, H, W) decodes with s_J set to the target
    s: torch.Tensor  # (P, B, K) the decodes re-encoded
    gain_per_image: torch.Tensor  # (P, B) NaN where the gap was too small to measure
    gain: torch.Tensor  # (P,) mean over the counted images
    pooled_gain: torch.Tensor  # (P,) Σ Δ / Σ gap over the counted images
    counted: torch.Tensor  # (P,) images in the mean
    pixel_change: torch.Tensor  # (P,) mean |edited − reconstruction| on the [-1, 1] scale
    off_target: torch.Tensor  # (P,) mean |Δs_k| over the prototypes k ≠ J

    def summary(self, prototypes: Sequence[int]) -> dict:
        def per(t: torch.Tensor) -> dict[str, float]:
            return {str(j): float(v) for j, v in zip(prototypes, t)}

        def mean(t: torch.Tensor) -> float:
            ok = ~t.isnan()
            return float(t[ok].mean()) if bool(ok.any()) else float("nan")

        return {
            "gain_mean": mean(self.gain),
            "pooled_gain_mean": mean(self.pooled_gain),
            "pixel_change_mean": mean(self.pixel_change),
            "off_target_mean": mean(self.off_target),
            "gain": per(self.gain),
            "pooled_gain": per(self.pooled_gain),
            "counted_images": {str(j): int(v) for j, v in zip(prototypes, self.counted)},
            "target": per(self.target),
            "pixel_change": per(self.pixel_change),
            "off_target": per(self.off_target),
        }


@dataclass
class EditGain:
    prototypes: list[int]
    reconstruction: torch.Tensor  # (B, C, H, W) the latent decoded under the images' own s
    s_reconstruction: torch.Tensor  # (B, K)
    raised: DirectionGain
    lowered: DirectionGain


def _direction(
    prototypes: Sequence[int],
    target: torch.Tensor,
    images: torch.Tensor,
    s: torch.Tensor,
    recon: torch.Tensor,
    s_rec: torch.Tensor,
    span: torch.Tensor,
    min_gap: float,
) -> DirectionGain:
    idx = torch.tensor(list(prototypes), dtype=torch.long)
    P = len(idx)
    arange = torch.arange(P)
    rec_j = s_rec[:, idx].T.double()  # (P, B)
    got_j = s[arange, :, idx].double()  # (P, B)
    gap, delta = target[:, None].double() - rec_j, got_j - rec_j
    counted = gap.abs() >= min_gap * span[:, None].double()
    per_image = torch.where(counted, delta / gap.where(counted, torch.ones_like(gap)), torch.full_like(gap, float("nan")))
    n = counted.sum(1)
    gain = torch.where(n > 0, per_image.nan_to_num(0).sum(1) / n.clamp_min(1), torch.full((P,), float("nan"), dtype=torch.double))
    pooled_den = (gap * counted).sum(1)
    pooled = torch.where(
        n > 0,
        (delta * counted).sum(1) / pooled_den.where(n > 0, torch.ones_like(pooled_den)),
        torch.full((P,), float("nan"), dtype=torch.double),
    )
    pixel = (images - recon[None]).abs().flatten(1).mean(1)
    ds = (s - s_rec[None]).abs()  # (P, B, K)
    others = torch.ones(P, s.shape[-1], dtype=torch.bool)
    others[arange, idx] = False
    off = (ds * others[:, None]).sum((1, 2)) / (others.sum(1) * s.shape[1]).clamp_min(1)
    return DirectionGain(target.float(), images, s, per_image.float(), gain.float(), pooled.float(), n, pixel.float(), off.float())


def edit_gain(
    pipe: PatronusPipeline,
    images: torch.Tensor,
    prototypes: Sequence[int],
    levels: Mapping[str, torch.Tensor],
    steps: int = 50,
    inverted_steps: Optional[int] = None,  # None = invert all the way to x_T
    edit_guidance: float = 1.0,  # 1 = no edit guidance: ε̂(x_t, t, s_edit) alone
    min_gap: float = 0.1,  # 0 = count every image, even one already at the target
    batch_size: int = 64,
) -> EditGain:
    """Raise (s_J := levels['q99'][J], q99) and lower (s_J := levels['q01'][J], q01) each prototype
    in `prototypes` alone, decoding the same inverted latent (`pipe.edit`, edit guidance
    `edit_guidance`), and measure how far the re-encoded s_J moved towards the target (see the
    module docstring for the gain's definition)."""
    prototypes = list(prototypes)
    K = pipe.num_prototypes
    if not prototypes:
        raise ValueError("prototypes: expected at least one prototype to edit")
    bad = [j for j in prototypes if not 0 <= j < K]
    if bad:
        raise ValueError(f"prototypes {bad}: the model has K={K} prototypes (0..{K - 1})")
    for name in ("q99", "q01"):
        if name not in levels:
            raise ValueError(f"levels: missing {name!r} (q99/q01 per prototype, see patronus.interpret.stats.edit_levels)")
    if len(images) < 1:
        raise ValueError("images: expected at least one image")
    hi, lo = levels["q99"].float().cpu(), levels["q01"].float().cpu()
    # 1. Invert x0 -> x_T under s = g(x0), decode x_T under s (the reconstruction) and under each edited s:
    #    P raises (s_J := q99_J) first, then P lowers (s_J := q01_J).
    edits = [[Edit(j, "set", "q99")] for j in prototypes] + [[Edit(j, "set", "q01")] for j in prototypes]
    recon, decoded = [], []
    for i in range(0, len(images), batch_size):
        res = pipe.edit(images[i : i + batch_size], edits, steps, inverted_steps, levels, guidance=edit_guidance)
        recon.append(res.reconstruction.cpu())
        decoded.append(res.images.cpu())
    recon, decoded = torch.cat(recon), torch.cat(decoded, dim=1)  # (B, ...), (2P, B, ...)
    E, B = decoded.shape[:2]
    # 2. Re-encode reconstructions and decodes.
    s_rec = pipe.encode(recon).s.cpu()
    s_dec = pipe.encode(decoded.flatten(0, 1)).s.cpu().view(E, B, -1)
    # 3. gain_J per direction, counting images with |target_J − s_J(reconstruction)| ≥ min_gap · (q99_J − q01_J).
    P, idx = len(prototypes), torch.tensor(prototypes)
    span = (hi - lo)[idx].clamp_min(1e-8)
    up = _direction(prototypes, hi[idx], decoded[:P], s_dec[:P], recon, s_rec, span, min_gap)
    down = _direction(prototypes, lo[idx], decoded[P:], s_dec[P:], recon, s_rec, span, min_gap)
    return EditGain(prototypes, recon, s_rec, up, down)
