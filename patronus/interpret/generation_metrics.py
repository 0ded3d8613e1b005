"""FID / KID offline (torchmetrics), on images kept as lossless PNG files.

Feature networks, none of which downloads anything:
- `inception`: the standard FID InceptionV3 (torch-fidelity's `pt_inception-2015-12-05`
  weights) from a file the user supplies — numbers comparable with published FIDs;
- `encoder` (default): the patch features of a Patronus encoder (mean- and max-pooled over
  cells of the sigmoid add-on output) — by default the checkpoint's own, or a fixed reference
  run's (`--feature-checkpoint`) so that different checkpoints are scored in one space;
- `timm:NAME`: any timm backbone with a local weights file (pooled penultimate features).
Numbers from different feature networks are not comparable with each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchvision.io import write_png

from patronus.models.patronus import PatronusModel
from patronus.pipeline import PatronusPipeline
from patronus.safe_load import load_torch_file
from patronus.torch_utils import (
    from_uint8,
    to_uint8,  # noqa: F401  (still imported from here by interpret/faithfulness.py)
)


def psnr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per-image PSNR in dB for images in [-1, 1] (clamped first)."""
    return [float(peak_signal_noise_ratio(x, y, data_range=2.0)) for x, y in zip(a.clamp(-1, 1), b.clamp(-1, 1))]


def write_pngs(images: torch.Tensor, folder: Path, prefix: str = "") -> list[Path]:
    """One lossless PNG per image (uint8, C = 1 or 3), numbered from 0: exactly len(images) files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = folder / f"{prefix}{i:05d}.png"
        write_png(img.cpu(), str(path))
        paths.append(path)
    return paths


class EncoderFeatures(nn.Module):
    """uint8 images -> pooled Patronus patch features (2·D): mean over cells ‖ max over cells."""

    def __init__(self, model: PatronusModel):
        super().__init__()
        self.encoder = model.encoder.eval()
        self.channels = model.config.in_channels
        self.size = model.config.image_size
        self.num_features = 2 * model.config.prototype_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = from_uint8(images)
        if x.shape[1] != self.channels:  # RGB <-> grey, so any image folder can be scored
            x = x.mean(1, keepdim=True).expand(-1, self.channels, -1, -1)
        if x.shape[-1] != self.size:
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        z = self.encoder.features(x.to(next(self.encoder.parameters()).device)).flatten(2)  # (B, D, H'*W')
        return torch.cat([z.mean(2), z.amax(2)], 1).double().cpu()


class TimmFeatures(nn.Module):
    """uint8 images -> pooled features of a timm backbone loaded from a local file (no download)."""

    def __init__(self, name: str, weights: str, image_size: int = 224):
        super().__init__()
        import timm

        if not Path(weights).is_file():
            raise FileNotFoundError(f"feature_weights {weights}: no such file (timm:{name} needs local weights)")
        self.net = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(weights))).eval()
        cfg = self.net.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)))[None, :, None, None])
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)))[None, :, None, None])
        self.size = image_size
        self.num_features = self.net.num_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return self.net((x - self.mean) / self.std).double()


def checked_inception_weights(path: str) -> str:
    """The FID Inception weights file, after proving it holds only tensors (weights_only load).

    torch-fidelity reads the file with full unpickling; a file that loads under
    `weights_only=True` cannot run code, so handing it on afterwards is safe.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"inception_weights {path}: no such file; expected torch-fidelity's pt_inception-2015-12-05 weights "
            "(download once from github.com/toshas/torch-fidelity/releases on a machine with internet)"
        )
    try:
        state = load_torch_file(p, "inception_weights file")
    except ValueError as e:
        raise ValueError(f"inception_weights {e}; expected a plain state dict of tensors") from None
    if not isinstance(state, dict) or "Conv2d_1a_3x3.conv.weight" not in state:
        raise ValueError(f"inception_weights {path}: not an InceptionV3 state dict (no 'Conv2d_1a_3x3.conv.weight')")
    try:  # build the network now, so a file that does not fit fails before any sample is generated
        FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(p))
    except (ImportError, RuntimeError, KeyError, ValueError) as e:
        raise ValueError(
            f"inception_weights {path}: cannot build the FID InceptionV3 from it "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300]})"
        ) from None
    return str(p)


def feature_network(kind: str, model: PatronusModel, inception_weights: Optional[str] = None, feature_weights: Optional[str] = None):
    """`feature` argument for torchmetrics' FID/KID: 2048 (Inception with a local file) or a module."""
    if kind == "inception":
        if inception_weights is None:
            raise ValueError("features=inception needs inception_weights FILE (nothing is downloaded)")
        return 2048, {"feature_extractor_weights_path": checked_inception_weights(inception_weights)}
    if kind == "encoder":
        return EncoderFeatures(model), {}
    if kind.startswith("timm:"):
        if feature_weights is None:
            raise ValueError(f"features={kind} needs feature_weights FILE (nothing is downloaded)")
        return TimmFeatures(kind.removeprefix("timm:"), feature_weights), {}
    raise ValueError(f"features={kind!r}; expected inception, encoder or timm:<model name>")


def _rgb(images: torch.Tensor, kind) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1) if kind == 2048 and images.shape[1] == 1 else images


@torch.no_grad()
def fid_kid(
    real: torch.Tensor, fake: torch.Tensor, feature, extra: Optional[dict] = None, batch_size: int = 128, kid_subset: int = 1000
) -> dict[str, float]:
    """FID and KID (mean ± std over subsets) between two uint8 image sets (N, C, H, W)."""
    if real.dtype != torch.uint8 or fake.dtype != torch.uint8:
        raise TypeError("fid_kid expects uint8 images (what the PNG files hold); use to_uint8")
    if min(len(real), len(fake)) < 2:
        raise ValueError(f"FID needs at least 2 images per set (got {len(real)} real, {len(fake)} generated)")
    extra = extra or {}
    subset = min(kid_subset, max(2, min(len(real), len(fake)) // 2))  # subsets must differ to give a spread
    fid = FrechetInceptionDistance(feature=feature, reset_real_features=True, **extra)
    kid = KernelInceptionDistance(feature=feature if isinstance(feature, int) else fid.inception, subset_size=subset, **extra)
    for images, is_real in ((real, True), (fake, False)):
        for i in range(0, len(images), batch_size):
            chunk = _rgb(images[i : i + batch_size], feature)
            fid.update(chunk, real=is_real)
            kid.update(chunk, real=is_real)
    kid_mean, kid_std = kid.compute()
    return {
        "fid": float(fid.compute()),
        "kid_mean": float(kid_mean),
        "kid_std": float(kid_std),
        "real_images": len(real),
        "generated_images": len(fake),
        "kid_subset_size": subset,
    }


def generate_like(
    pipe: PatronusPipeline, real: torch.Tensor, steps: int = 50, seed: int = 0, batch_size: int = 100, unconditional: bool = False
) -> torch.Tensor:
    """One generated image per real image (N, C, H, W), as uint8 the way a PNG stores it.

    Conditional (default): x̃ decoded from s = g(x0) of the real image and a fresh x_T, so the
    score says how well s pins down an image. `unconditional`: s drawn from the run's activation
    prior instead (`pipe.generate`), as many as there are real images. Batch b (of `batch_size`
    images, from image i = b · batch_size) is seeded `seed + i`."""
    fake = []
    for i in range(0, len(real), batch_size):
        chunk = real[i : i + batch_size]
        if unconditional:
            images, _ = pipe.generate(len(chunk), steps, seed + i)
        else:
            images = pipe.sample(pipe.encode(chunk).s, seed=seed + i, steps=steps)
        fake.append(to_uint8(images).cpu())
    return torch.cat(fake)
