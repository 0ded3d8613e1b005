"""ProtoPNet-style prototype encoder: image -> K log-similarity activations (Patronus Eq. 1-2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from patronus.safe_load import load_state_dict_file
from patronus.torch_utils import eval_mode


@dataclass(frozen=True)
class ConvLayout:
    """Channels/kernels/strides/paddings of a plain Conv->ReLU encoder."""

    channels: tuple[int, ...]
    kernels: tuple[int, ...]
    strides: tuple[int, ...]
    paddings: tuple[int, ...]


# The paper's per-dataset encoders (Patronus code, `plb_*` settings). 32/64 px: RF 15, jump 2;
# CheXpert 224 px: RF 61, jump 4. The first entry of `channels` is replaced by the image channels.
ENCODER_LAYOUTS: dict[str, ConvLayout] = {
    "paper32": ConvLayout((1, 32, 64, 64, 128), (3, 3, 3, 3), (2, 1, 1, 1), (1, 0, 0, 0)),
    "paper64": ConvLayout((3, 32, 64, 64, 128), (3, 3, 3, 3), (2, 1, 1, 1), (1, 0, 0, 0)),
    "chexpert": ConvLayout((1, 32, 64, 64, 128, 128), (5, 5, 5, 5, 5), (2, 2, 1, 1, 1), (1, 1, 0, 0, 0)),
}


@dataclass
class Activations:
    """What the prototype encoder says about images (Patronus Eq. 1-2)."""

    s: torch.Tensor  # (B, K) log-similarity activations, the denoiser's only condition
    where: torch.Tensor  # (B, K) long: flat index of each prototype's closest feature cell (the "where")
    distances: torch.Tensor  # (B, K) squared L2 distance at that cell


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of one feature cell (ProtoPNet RF recursion)."""

    size: int  # r: side of the square box in pixels
    jump: int  # j: pixel distance between neighbouring cells
    start: float  # centre of cell (0, 0) in pixel coordinates
    image_size: int

    def box(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) pixel box of cell (h, w), clipped to the image; end-exclusive."""
        half = (self.size - 1) / 2
        top, left = self.start + h * self.jump - half, self.start + w * self.jump - half
        clip = lambda v: int(min(max(v, 0), self.image_size))  # noqa: E731
        return clip(top), clip(left), clip(top + self.size), clip(left + self.size)


def conv_receptive_field(layout: ConvLayout, image_size: int) -> ReceptiveField:
    """ProtoPNet recursion: n'=⌊(n−k+2p)/s⌋+1, j'=j·s, r'=r+(k−1)·j, start'=start+((k−1)/2−p)·j."""
    r, j, start = 1, 1, 0.5 - 0.5  # pixel centres at integer coordinates
    for k, s, p in zip(layout.kernels, layout.strides, layout.paddings):
        r, start, j = r + (k - 1) * j, start + ((k - 1) / 2 - p) * j, j * s
    return ReceptiveField(size=r, jump=j, start=start, image_size=image_size)


def conv_encoder(layout: ConvLayout, in_channels: int) -> nn.Sequential:
    """Conv->ReLU stack (the paper's encoder); the last conv is linear, the add-on layer follows."""
    chans = (in_channels, *layout.channels[1:])
    layers: list[nn.Module] = []
    for i, (k, s, p) in enumerate(zip(layout.kernels, layout.strides, layout.paddings)):
        layers.append(nn.Conv2d(chans[i], chans[i + 1], k, s, p))
        if i < len(layout.kernels) - 1:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class TimmFeatures(nn.Module):
    """One feature level of a timm backbone, projected to the prototype dimension by a 1x1 conv."""

    def __init__(self, name: str, in_channels: int, out_dim: int, weights: Optional[str], out_index: int):
        super().__init__()
        import timm  # imported lazily: only backbone users pay for it

        self.body = timm.create_model(name, pretrained=False, features_only=True, in_chans=in_channels, out_indices=(out_index,))
        if weights is not None:  # a local file only: nothing is downloaded, nothing unpickled
            state = load_state_dict_file(weights, "backbone_weights file")
            missing, _ = self.body.load_state_dict(state, strict=False)
            if len(missing) == len(self.body.state_dict()):
                raise ValueError(f"backbone_weights {weights!r}: no tensor matches timm model {name!r}")
        self.proj = nn.Sequential(nn.Conv2d(self.body.feature_info.channels()[-1], out_dim, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.body(x)[-1])


class PrototypeEncoder(nn.Module):
    """Encoder f (ending in a sigmoid add-on) + K prototype vectors; `forward` gives activations s (B, K).

    Distances are computed as convolutions, ||z||² − 2 z·p + ||p||², so all prototypes and
    all cells are one conv call; the argmin cell is kept because it is the "where".
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 32,
        num_prototypes: int = 30,
        prototype_dim: int = 128,
        layout: str = "paper32",
        backbone: Optional[str] = None,
        backbone_weights: Optional[str] = None,
        backbone_out_index: int = 2,
        epsilon: float = 1e-4,
        position_weight: float = 0.0,
    ):
        super().__init__()
        if not position_weight >= 0:
            raise ValueError(f"model.net.position_weight={position_weight!r}; expected a number >= 0")
        self.image_size, self.epsilon, self.position_weight = image_size, epsilon, float(position_weight)
        if backbone is not None:
            self.features: nn.Module = TimmFeatures(backbone, in_channels, prototype_dim, backbone_weights, backbone_out_index)
            self._layout = None
        else:
            if layout not in ENCODER_LAYOUTS:
                raise ValueError(f"encoder_layout={layout!r} is unknown; expected one of {sorted(ENCODER_LAYOUTS)}")
            self._layout = ENCODER_LAYOUTS[layout]
            self.features = conv_encoder(self._layout, in_channels)
            if self._layout.channels[-1] != prototype_dim:
                self.features.append(nn.Conv2d(self._layout.channels[-1], prototype_dim, 1))
            # ProtoPNet's add-on activation: features in [0, 1]^D keep distances bounded (d ≤ D);
            # without it, unbounded features drift apart and every s collapses towards 0.
            self.features.append(nn.Sigmoid())
        # ProtoPNet initialisation: uniform in the same unit cube as the features.
        self.prototypes = nn.Parameter(torch.rand(num_prototypes, prototype_dim))
        if self.position_weight > 0:
            # Where each prototype is expected, in (row, col) image coordinates scaled to [0, 1]; only a
            # position-aware encoder has it, so checkpoints of position-free ones keep their keys.
            self.prototype_positions = nn.Parameter(torch.rand(num_prototypes, 2))

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.shape[0]

    def distance_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Squared L2 distance of every feature cell to every prototype: (B, K, H', W').

        With `position_weight` λ > 0 the distance also counts where the cell is:
        d_k(h, w) = ||z_hw − p_k||² + λ·||c_hw − c_k||², c in [0, 1]² image coordinates. The plain
        ProtoPNet minimum over cells keeps only *what*, so a small marker that differs from a stroke
        only by *where* it sits (a corner tag, a laterality letter) gets no prototype of its own.
        """
        return self.feature_distance_maps(self.features(x))

    def feature_distance_maps(self, z: torch.Tensor) -> torch.Tensor:
        """`distance_maps` of a feature map z = f(x) (B, D, H', W') already computed."""
        z2 = z.pow(2).sum(1, keepdim=True)  # (B, 1, H', W')
        zp = F.conv2d(z, self.prototypes[:, :, None, None])  # (B, K, H', W')
        p2 = self.prototypes.pow(2).sum(1)[None, :, None, None]  # (1, K, 1, 1)
        d = (z2 - 2 * zp + p2).clamp_min(0)
        if self.position_weight > 0:
            cells = self.cell_positions(d.shape[2], d.shape[3]).to(d)  # (H'W', 2)
            d = d + self.position_cost(cells).view(1, -1, d.shape[2], d.shape[3])
        return d

    def position_cost(self, cells: torch.Tensor) -> torch.Tensor:
        """λ·||c − c_k||² of cells at positions `cells` (N, 2) for every prototype k: (K, N)."""
        return self.pairwise_position_cost(self.prototype_positions.to(cells), cells)

    def pairwise_position_cost(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """λ·||a_i − b_j||² between positions a (M, 2) and b (N, 2): (M, N); zeros for a position-free encoder."""
        return self.position_weight * (a[:, None] - b[None]).pow(2).sum(2)

    @torch.no_grad()
    def patch_pair_distances(self, features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Distance between patches (features (N, D) at positions (N, 2)) as `distance_maps` counts it
        between a patch and a prototype: (N, N). Patches that would match the same prototype are near."""
        return torch.cdist(features.float(), features.float()).pow(2) + self.pairwise_position_cost(positions.float(), positions.float())

    @staticmethod
    def cell_positions(height: int, width: int) -> torch.Tensor:
        """(row, col) of every feature cell in row-major order, scaled to [0, 1]: (H'W', 2)."""
        rows = torch.linspace(0, 1, height) if height > 1 else torch.zeros(1)
        cols = torch.linspace(0, 1, width) if width > 1 else torch.zeros(1)
        return torch.cartesian_prod(rows, cols)

    @torch.no_grad()
    def patch_distances(self, feature: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Distance of one patch (its feature, at `position` (row, col) in [0, 1]²) to every prototype, as
        `distance_maps` counts it: (K,)."""
        d = (self.prototypes.float() - feature.float()).pow(2).sum(1)
        if self.position_weight > 0:
            d = d + self.position_cost(position.reshape(1, 2).to(d))[:, 0]
        return d

    @torch.no_grad()
    def place_prototype(self, k: int, feature: torch.Tensor, position: torch.Tensor) -> None:
        """Move prototype k onto a patch: its feature and, for a position-aware encoder, its position
        ((row, col) in [0, 1]², e.g. `cell_positions(*feature_shape())[cell]`)."""
        self.prototypes[k] = feature.to(self.prototypes)
        if self.position_weight > 0:
            self.prototype_positions[k] = position.to(self.prototype_positions)

    def activations_from_distances(self, dmin: torch.Tensor) -> torch.Tensor:
        """Patronus/ProtoPNet log-similarity: s = log((d + 1) / (d + ε))."""
        return torch.log((dmin + 1) / (dmin + self.epsilon))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Activations s (B, K) of images x (Patronus Eq. 1-2): what the denoiser is conditioned on."""
        return self.activations(x).s

    def encode_features(self, z: torch.Tensor) -> torch.Tensor:
        """`encode` of a feature map z = f(x) already computed (training reuses it for the decoder)."""
        return self.feature_activations(z).s

    def activations(self, x: torch.Tensor) -> Activations:
        """Everything the encoder says about images x: s, and where and how far each prototype's closest cell is."""
        return self.feature_activations(self.features(x))

    def feature_activations(self, z: torch.Tensor) -> Activations:
        """`activations` of a feature map z = f(x) already computed."""
        d = self.feature_distance_maps(z).flatten(2)  # (B, K, H'*W')
        dmin, where = d.min(dim=2)
        return Activations(self.activations_from_distances(dmin), where, dmin)

    def feature_decoder(self) -> nn.Module:
        """A new decoder from this encoder's feature map back to the image, for the reconstruction loss
        (Li et al. 2018, "Deep Learning for Case-Based Reasoning through Prototypes", Eq. 2's R term):
        features that must redraw their own patch keep what is there, a small stamped marker included,
        instead of only what the denoiser already reads through the prototypes. A conv layout is
        mirrored (transposed convs, the same kernels and strides: each cell redraws its receptive field);
        a timm backbone's features are upsampled to the image and refined by two convs."""
        c, d = self._in_channels(), self.prototypes.shape[1]
        if self._layout is None:
            return nn.Sequential(
                nn.Conv2d(d, 64, 1),
                nn.ReLU(),
                nn.Upsample(size=self.image_size, mode="bilinear"),
                nn.Conv2d(64, 32, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, c, 3, padding=1),
            )
        lay = self._layout
        chans, sizes = (c, *lay.channels[1:-1], d), [self.image_size]
        for k, st, p in zip(lay.kernels, lay.strides, lay.paddings):
            sizes.append((sizes[-1] - k + 2 * p) // st + 1)
        layers: list[nn.Module] = []
        for i in reversed(range(len(lay.kernels))):
            k, st, p = lay.kernels[i], lay.strides[i], lay.paddings[i]
            lost = sizes[i] - ((sizes[i + 1] - 1) * st - 2 * p + k)  # rows the strided conv's floor dropped
            layers.append(nn.ConvTranspose2d(chans[i + 1], chans[i], k, st, p, output_padding=lost))
            if i > 0:
                layers.append(nn.ReLU(inplace=True))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)

    def feature_shape(self) -> tuple[int, int]:
        p = next(self.parameters())
        with torch.no_grad():
            z = self.features(torch.zeros(1, self._in_channels(), self.image_size, self.image_size, device=p.device))
        return int(z.shape[2]), int(z.shape[3])

    def _in_channels(self) -> int:
        first = next(m for m in self.features.modules() if isinstance(m, nn.Conv2d))
        return first.in_channels

    def receptive_field(self) -> ReceptiveField:
        """Exact RF by the recursion for conv layouts; measured by gradients for timm backbones."""
        if self._layout is not None:
            return conv_receptive_field(self._layout, self.image_size)
        return gradient_receptive_field(self.features, self._in_channels(), self.image_size)

    def cell_box(self, flat_index: int) -> tuple[int, int, int, int]:
        """Pixel box of a flat cell index (`activations(x).where`)."""
        _, w = self.feature_shape()
        return self.receptive_field().box(flat_index // w, flat_index % w)


def gradient_box(features: nn.Module, in_channels: int, image_size: int, h: int, w: int) -> tuple[int, int, int, int]:
    """Pixels whose value can change feature cell (h, w): the brute-force definition of an RF box."""
    x = torch.randn(4, in_channels, image_size, image_size, requires_grad=True)
    with eval_mode(features):
        z = features(x)
    (grad,) = torch.autograd.grad(z[:, :, h, w].abs().sum(), x)
    rows = grad.abs().sum((0, 1, 3)).nonzero().flatten()
    cols = grad.abs().sum((0, 1, 2)).nonzero().flatten()
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


def gradient_receptive_field(features: nn.Module, in_channels: int, image_size: int) -> ReceptiveField:
    """RF of a network without a clean layer recursion, from two interior cells' gradient boxes."""
    with torch.no_grad():
        hh, ww = features(torch.zeros(1, in_channels, image_size, image_size)).shape[2:]
    c = hh // 2
    t0, _, b0, _ = gradient_box(features, in_channels, image_size, c, c)
    if hh > 1:
        t1, _, _, _ = gradient_box(features, in_channels, image_size, c + 1, c)
        jump = t1 - t0
    else:
        jump = image_size
    size = b0 - t0
    return ReceptiveField(size=size, jump=max(jump, 1), start=t0 + (size - 1) / 2 - c * max(jump, 1), image_size=image_size)
