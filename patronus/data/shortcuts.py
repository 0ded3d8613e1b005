"""Shortcut builders: datasets with a known confounder, so a shortcut diagnosis can be scored.

Each builder is a function (dataset in, dataset out, deterministic under `seed`), reports the
correlations it produced, and is reachable from a config (`data.shortcut: {kind: ..., ...}`)
and from the command line (`python -m patronus.cli.shortcut_data --help`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Optional, Union

import torch

from patronus.data.datasets import LabelledImageDataset, SubsetDataset


def attribute_column(ds: LabelledImageDataset, name: str) -> torch.Tensor:
    """Binary column (N,) of attribute `name` (NaN = unknown), with a clear error when absent."""
    if name not in ds.attribute_names:
        raise ValueError(f"attribute {name!r} not in this dataset; it has {ds.attribute_names}")
    return ds.attributes[:, ds.attribute_names.index(name)]


def phi(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two binary columns (phi coefficient), rows with NaN left out."""
    keep = ~(a.isnan() | b.isnan())
    a, b = a[keep].double(), b[keep].double()
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(((a - a.mean()) * (b - b.mean())).mean() / (a.std(unbiased=False) * b.std(unbiased=False)))


def rate_difference(target: torch.Tensor, confounder: torch.Tensor) -> float:
    """P(confounder | target) − P(confounder | not target), rows with NaN left out: the effect size
    of a link. Unlike φ it does not grow as the confounder gets rare, and it bounds what the
    confounder alone can do for the target: a perfect detector of it has AUROC 0.5 + difference / 2."""
    keep = ~(target.isnan() | confounder.isnan())
    t, c = target[keep] == 1, confounder[keep].double()
    if not (t.any() and (~t).any()):
        return float("nan")
    return float(c[t].mean() - c[~t].mean())


def correlation_report(ds: LabelledImageDataset, names: Sequence[str]) -> dict[str, Any]:
    """Counts and pairwise phi correlations of the named attributes (what the paper's notebook printed)."""
    cols = {n: attribute_column(ds, n) for n in names}
    report: dict[str, Any] = {"rows": len(ds), "positives": {n: int((c == 1).sum()) for n, c in cols.items()}, "phi": {}}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            report["phi"][f"{a}~{b}"] = phi(cols[a], cols[b])
    return report


# 1. CelebA hair <-> smile (the paper's recipe) ---------------------------------------------

HAIR = ("Black_Hair", "Blond_Hair", "Brown_Hair")


def celeba_hair_smile(ds: LabelledImageDataset, seed: int = 0) -> tuple[SubsetDataset, dict[str, Any]]:
    """Images with exactly one of Black/Blond/Brown hair, then keep Blond∧Smiling, Black∧¬Smiling
    and Brown∧Smiling, so hair colour predicts smiling (61,214 rows on full CelebA, all splits).
    Applied per split, so the official partition is kept. `seed` is unused (no sampling)."""
    black, blond, brown, smile = (attribute_column(ds, n) == 1 for n in (*HAIR, "Smiling"))
    one_hair = (black.int() + blond.int() + brown.int()) == 1
    keep = one_hair & ((blond & smile) | (black & ~smile) | (brown & smile))
    out = SubsetDataset(ds, keep.nonzero().flatten())
    report = correlation_report(out, [*HAIR, "Smiling"])
    report["cells"] = {
        f"{h}&{'Smiling' if s else 'not_Smiling'}": int(
            ((attribute_column(out, h) == 1) & ((attribute_column(out, "Smiling") == 1) == s)).sum()
        )
        for h in HAIR
        for s in (True, False)
    }
    return out, report


# 2. Planted marker --------------------------------------------------------------------------

Shape = Literal["square", "disc", "ring", "cross", "line", "glyph"]
SHAPES: tuple[str, ...] = ("square", "disc", "ring", "cross", "line", "glyph")

# 3×5 bitmaps of a few letters, like the laterality letters ("L", "R") burnt into X-rays.
_GLYPHS: dict[str, tuple[str, ...]] = {
    "L": ("100", "100", "100", "100", "111"),
    "R": ("110", "101", "110", "101", "101"),
    "A": ("010", "101", "111", "101", "101"),
    "P": ("110", "101", "110", "100", "100"),
    "X": ("101", "101", "010", "101", "101"),
}


def _glyph(text: str, size: int) -> torch.Tensor:
    """(size, size) mask of `text` in the 3×5 bitmap font, scaled by a whole factor (crisp strokes), centred."""
    bad = [c for c in text if c not in _GLYPHS]
    if not text or bad:
        raise ValueError(f"shortcut.text={text!r}; expected one or more of the letters {''.join(_GLYPHS)}")
    rows = ["0".join(_GLYPHS[c][r] for c in text) for r in range(5)]  # one blank column between letters
    bitmap = torch.tensor([[float(v) for v in row] for row in rows])  # (5, 4n−1)
    scale = size // max(bitmap.shape)
    if scale < 1:
        raise ValueError(f"shortcut.size={size}: a glyph of {text!r} needs at least {max(bitmap.shape)} pixels")
    big = bitmap.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    out = torch.zeros(size, size)
    top, left = (size - big.shape[0]) // 2, (size - big.shape[1]) // 2
    out[top : top + big.shape[0], left : left + big.shape[1]] = big
    return out


def shape_mask(shape: Shape, size: int, thickness: Optional[int] = None, text: str = "R") -> torch.Tensor:
    """(size, size) binary mask of one marker shape. `thickness` (ring, cross, line; default size//4,
    at least 1) is the stroke width; `text` the letters of a glyph."""
    if shape not in SHAPES:
        raise ValueError(f"shortcut.shape={shape!r}; expected one of {list(SHAPES)}")
    t = max(1, size // 4) if thickness is None else int(thickness)
    if not 1 <= t <= size:
        raise ValueError(f"shortcut.thickness={thickness}; expected 1..size={size} pixels")
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    r = (size - 1) / 2
    dist = ((yy - r) ** 2 + (xx - r) ** 2).sqrt()
    lo, hi = (size - t) // 2, (size - t) // 2 + t  # the centred band of width t
    if shape == "square":
        return torch.ones(size, size)
    if shape == "disc":
        return (dist**2 <= r**2 + 0.25).float()
    if shape == "ring":
        return ((dist <= r + 0.5) & (dist > r + 0.5 - t)).float()
    if shape == "cross":
        band = torch.zeros(size, size)
        band[lo:hi, :] = 1
        band[:, lo:hi] = 1
        return band
    if shape == "line":
        band = torch.zeros(size, size)
        band[lo:hi, :] = 1  # a horizontal stroke `size` long, `thickness` wide
        return band
    return _glyph(text, size)


def marker_mask(
    size: int, image_size: int, top: int, left: int, shape: Shape, thickness: Optional[int] = None, text: str = "R"
) -> torch.Tensor:
    """(1, H, W) mask of one marker with its top-left corner at (top, left)."""
    mask = torch.zeros(1, image_size, image_size)
    mask[0, top : top + size, left : left + size] = shape_mask(shape, size, thickness, text)
    return mask


def _check_region(region: Sequence[int], size: int, image_size: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the area random markers are drawn inside (bottom/right exclusive)."""
    if len(region) != 4:
        raise ValueError(f"shortcut.region={list(region)}; expected [top, left, bottom, right] in pixels")
    top, left, bottom, right = (int(v) for v in region)
    if not (0 <= top and 0 <= left and bottom <= image_size and right <= image_size and bottom - top >= size and right - left >= size):
        raise ValueError(f"shortcut.region={list(region)}: must lie in the {image_size}px image and hold a {size}px marker")
    return top, left, bottom, right


class PlantedMarker(LabelledImageDataset):
    """Stamps a marker on images of the target group with probability p, on the others with q.

    Every random choice is drawn once at construction from `seed`, so the dataset is fixed.
    Items also carry `marker_mask` (1, H, W), and attribute "marker" records who got one, so a
    diagnosis can be scored against ground truth (e.g. a bright pacemaker-like blob on chest
    X-rays of one class, a laterality letter, a thin ruler line, or a corner patch on digits).

    Args:
        shape: square, disc, ring, cross, line (horizontal stroke) or glyph (the letters `text`).
        size: side of the marker's square box in pixels.
        position: [top, left] of a fixed marker, or "random" (a new position per image, inside `region`).
        region: [top, left, bottom, right] random markers stay inside (default: the whole image).
        intensity: the marker's pixel value in [-1, 1] (1 = white, −1 = black).
        opacity: 1 stamps the marker; below 1 it is blended over the image (a faint, semi-transparent patch).
        thickness: stroke width of ring, cross and line (default size // 4).
        text: letters of a glyph marker (from L, R, A, P, X).
    """

    def __init__(
        self,
        base: LabelledImageDataset,
        image_size: int,
        target: Union[str, int],
        p: float = 0.9,
        q: float = 0.1,
        shape: Shape = "square",
        size: int = 4,
        position: Union[Literal["random"], Sequence[int]] = (1, 1),
        intensity: float = 1.0,
        seed: int = 0,
        region: Optional[Sequence[int]] = None,
        opacity: float = 1.0,
        thickness: Optional[int] = None,
        text: str = "R",
    ):
        for name, v in (("p", p), ("q", q), ("opacity", opacity)):
            if not 0 <= v <= 1:
                raise ValueError(f"shortcut.{name}={v}; expected a value in [0, 1]")
        if not 0 < size <= image_size:
            raise ValueError(f"shortcut.size={size}; expected 1..{image_size} pixels")
        if not -1 <= intensity <= 1:
            raise ValueError(f"shortcut.intensity={intensity}; expected a pixel value in [-1, 1]")
        self.stamp = shape_mask(shape, size, thickness, text)  # (size, size), checks shape/thickness/text
        self.base, self.image_size, self.shape, self.size = base, image_size, shape, size
        self.intensity, self.opacity = intensity, opacity
        group = self._target_group(base, target)
        gen = torch.Generator().manual_seed(seed)
        u = torch.rand(len(base), generator=gen)
        self.has_marker = torch.where(group, u < p, u < q)
        if position == "random":
            if region is None:  # the whole image (one draw, as before regions existed: same datasets)
                self.corners = torch.randint(0, image_size - size + 1, (len(base), 2), generator=gen)
            else:
                top, left, bottom, right = _check_region(region, size, image_size)
                rows = torch.randint(top, bottom - size + 1, (len(base),), generator=gen)
                cols = torch.randint(left, right - size + 1, (len(base),), generator=gen)
                self.corners = torch.stack([rows, cols], 1)
        else:
            if region is not None:
                raise ValueError("shortcut.region: only for position='random' (a fixed marker has its own position)")
            top, left = (int(v) for v in position)
            if not (0 <= top <= image_size - size and 0 <= left <= image_size - size):
                raise ValueError(f"shortcut.position={list(position)}: a {size}px marker must fit in {image_size}px")
            self.corners = torch.tensor([top, left]).expand(len(base), 2)
        self.labels, self.classes = base.labels, list(base.classes)
        self.attribute_names = [*base.attribute_names, "marker"]
        self.attributes = torch.cat([base.attributes, self.has_marker.float()[:, None]], dim=1)

    @staticmethod
    def _target_group(base: LabelledImageDataset, target: Union[str, int]) -> torch.Tensor:
        if isinstance(target, int) or (isinstance(target, str) and target.lstrip("-").isdigit() and target not in base.attribute_names):
            return base.labels == int(target)
        return attribute_column(base, str(target)) == 1

    def placed_mask(self, i: int) -> torch.Tensor:
        """(1, H, W) where image i's marker is or would be (whether or not it got one)."""
        top, left = (int(v) for v in self.corners[i])
        mask = torch.zeros(1, self.image_size, self.image_size)
        mask[0, top : top + self.size, left : left + self.size] = self.stamp
        return mask

    def mask(self, i: int) -> torch.Tensor:
        if not self.has_marker[i]:
            return torch.zeros(1, self.image_size, self.image_size)
        return self.placed_mask(i)

    def stamped(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (C, H, W) with the marker blended in where mask (1, H, W) is 1."""
        a = self.opacity * mask
        return x * (1 - a) + self.intensity * a

    def load_image(self, i: int) -> torch.Tensor:
        return self.stamped(self.base.load_image(i), self.mask(i))

    def with_and_without(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image i with its marker forced on and off (same position): the pair confounder sensitivity compares."""
        x = self.base.load_image(i)
        return self.stamped(x, self.placed_mask(i)), x

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        item["marker_mask"] = self.mask(i)
        return item


def planted_marker(
    ds: LabelledImageDataset, image_size: int, target: Union[str, int], seed: int = 0, **kwargs
) -> tuple[PlantedMarker, dict[str, Any]]:
    out = PlantedMarker(ds, image_size, target, seed=seed, **kwargs)
    group = PlantedMarker._target_group(ds, target).float()
    report = {
        "rows": len(out),
        "target": str(target),
        "with_marker": int(out.has_marker.sum()),
        "marker_rate_in_target": float(out.has_marker[group == 1].float().mean()) if group.any() else float("nan"),
        "marker_rate_elsewhere": float(out.has_marker[group == 0].float().mean()) if (group == 0).any() else float("nan"),
        "phi_target~marker": phi(group, out.has_marker.float()),
    }
    return out, report


# 3. Label-correlated subsampling ------------------------------------------------------------


def correlated_subset(
    ds: LabelledImageDataset, a: str, b: str, correlation: float, seed: int = 0, size: Optional[int] = None
) -> tuple[SubsetDataset, dict[str, Any]]:
    """Subset where binary attribute `a` predicts `b` with phi ≈ `correlation` (balanced a and b).

    With P(a)=P(b)=½ and P(b=a) = (1+ρ)/2, phi = ρ exactly; each of the four (a, b) cells is
    sampled without replacement, as many rows as the scarcest cell allows (or `size`).
    """
    if not -1 <= correlation <= 1:
        raise ValueError(f"shortcut.correlation={correlation}; expected a value in [-1, 1]")
    ca, cb = attribute_column(ds, a), attribute_column(ds, b)
    agree, disagree = (1 + correlation) / 4, (1 - correlation) / 4  # share of each cell
    cells = {(x, y): ((ca == x) & (cb == y)).nonzero().flatten() for x in (0, 1) for y in (0, 1)}
    share = {(x, y): agree if x == y else disagree for (x, y) in cells}
    limit = min(len(idx) / share[c] for c, idx in cells.items() if share[c] > 0)
    total = int(min(limit, size) if size is not None else limit)
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c, idx in cells.items():
        n = int(round(total * share[c]))
        picked.append(idx[torch.randperm(len(idx), generator=gen)[:n]])
    out = SubsetDataset(ds, torch.cat(picked).sort().values)
    report = correlation_report(out, [a, b])
    report["requested_phi"] = correlation
    return out, report


BUILDERS: dict[str, Callable[..., tuple[LabelledImageDataset, dict[str, Any]]]] = {
    "celeba_hair_smile": celeba_hair_smile,
    "planted_marker": planted_marker,
    "correlated_subset": correlated_subset,
}


def apply_shortcut(ds: LabelledImageDataset, image_size: int, spec: dict[str, Any]) -> tuple[LabelledImageDataset, dict[str, Any]]:
    """`data.shortcut` config -> (wrapped dataset, correlation report)."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in BUILDERS:
        raise ValueError(f"data.shortcut.kind={kind!r}; expected one of {sorted(BUILDERS)}")
    if kind == "planted_marker":
        spec["image_size"] = image_size
    try:
        return BUILDERS[kind](ds, **spec)
    except TypeError as e:
        raise ValueError(f"data.shortcut ({kind}): {e}") from None
