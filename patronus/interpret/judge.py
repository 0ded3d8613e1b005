"""The judge: an independent classifier of real images, to read generated images from outside the Patronus encoder.

A small CNN (`JudgeNet`) trained on real images (`train_judge`) predicts the class and binary
attributes of an image; `judge_accuracy` measures it on real held-out images (how far to trust it
as a judge of samples), and `JudgeFeatures` exposes its pooled features as the feature space of a
Fréchet distance (`patronus.interpret.agreement.sample_quality`). It is *not* the Patronus encoder:
what it says about a sample does not come from the s the sample was decoded from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class JudgeNet(nn.Module):
    """Three 3×3 conv blocks (BN, ReLU; max-pool after the first two), a 4×4 adaptive average
    pool and one linear layer with `num_classes` class logits + `num_attributes` attribute logits."""

    def __init__(self, in_channels: int, num_classes: int, num_attributes: int, width: int = 16):
        super().__init__()
        w = width

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 2 * w),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * w * 16, num_classes + num_attributes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class JudgePrediction:
    classes: Optional[torch.Tensor]  # (N,) long, None when the judge has no classes
    attributes: Optional[torch.Tensor]  # (N, A) float 0/1, None when the judge has no attributes


@dataclass
class Judge:
    """A classifier of real images that is not the Patronus encoder: class and binary attributes."""

    net: JudgeNet
    num_classes: int
    num_attributes: int
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> JudgePrediction:
        """Class (argmax) and attributes (logit > 0) of images in [-1, 1]; results on the CPU."""
        dev = next(self.net.parameters()).device
        was = self.net.training
        self.net.eval()
        try:
            logits = (
                torch.cat([self.net(images[i : i + batch_size].to(dev).float()).float().cpu() for i in range(0, len(images), batch_size)])
                if len(images)
                else torch.zeros(0, self.num_classes + self.num_attributes)
            )
        finally:
            self.net.train(was)
        C = self.num_classes
        return JudgePrediction(logits[:, :C].argmax(1) if C else None, (logits[:, C:] > 0).float() if self.num_attributes else None)


def check_judge_data(images: torch.Tensor, labels: Optional[torch.Tensor], attributes: Optional[torch.Tensor]) -> None:
    """Images (N, C, H, W) with (N,) labels and (N, A) attributes when given; else a ValueError naming the field."""
    if images.ndim != 4:
        raise ValueError(f"images: expected (N, C, H, W), got shape {tuple(images.shape)}")
    for name, t in (("labels", labels), ("attributes", attributes)):
        if t is not None and len(t) != len(images):
            raise ValueError(f"{name}: {len(t)} rows for {len(images)} images")
    if attributes is not None and attributes.ndim != 2:
        raise ValueError(f"attributes: expected (N, A), got shape {tuple(attributes.shape)}")


def train_judge(
    images: torch.Tensor,
    labels: Optional[torch.Tensor] = None,  # (N,) class labels; None = the judge learns no class
    attributes: Optional[torch.Tensor] = None,  # (N, A) 0/1; None = the judge learns no attribute
    epochs: int = 2,
    seed: int = 0,
    num_classes: Optional[int] = None,  # None = the largest label + 1
    batch_size: int = 64,
    lr: float = 2e-3,
    width: int = 16,
    device: Optional[torch.device | str] = None,  # None = the images' device
) -> Judge:
    """Train a small CNN judge (`JudgeNet`) on real images (N, C, H, W) in [-1, 1].

    labels: (N,) long class labels, −1 = unknown (rows left out of the class loss); attributes:
    (N, A) 0/1 with NaN = unknown (left out of that attribute's loss). Cross-entropy + binary
    cross-entropy, Adam, `epochs` passes in a seeded order; deterministic for a seed on the CPU.
    The global RNG is left as it was.
    """
    check_judge_data(images, labels, attributes)
    if epochs < 1:
        raise ValueError(f"judge_epochs={epochs}; expected at least 1")
    if len(images) < 2:
        raise ValueError(f"images: {len(images)} training images; the judge needs at least 2")
    known = labels is not None and bool((labels >= 0).any())
    C = (num_classes if num_classes is not None else int(labels.max()) + 1) if known else 0
    A = attributes.shape[1] if attributes is not None else 0
    if C == 0 and A == 0:
        raise ValueError("labels/attributes: the judge needs class labels or binary attributes to learn")
    if known and int(labels.max()) >= C:
        raise ValueError(f"labels: label {int(labels.max())} but num_classes={C}")
    dev = torch.device(device) if device is not None else images.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = JudgeNet(images.shape[1], C, A, width).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    y = labels.long() if known else None
    a = attributes.float() if A else None
    gen = torch.Generator().manual_seed(seed)
    losses = []
    net.train()
    with torch.enable_grad():
        for _ in range(epochs):
            total, batches = 0.0, 0
            for idx in torch.randperm(len(images), generator=gen).split(batch_size):
                if len(idx) < 2:  # BatchNorm needs two rows
                    continue
                logits = net(images[idx].to(dev).float())
                loss = logits.new_zeros(())
                if C and bool((y[idx] >= 0).any()):
                    loss = loss + F.cross_entropy(logits[:, :C], y[idx].to(dev), ignore_index=-1)
                if A:
                    target = a[idx].to(dev)
                    ok = ~target.isnan()
                    if bool(ok.any()):
                        loss = loss + F.binary_cross_entropy_with_logits(logits[:, C:][ok], target[ok])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, batches = total + float(loss.detach()), batches + 1
            losses.append(total / max(batches, 1))
    net.eval()
    return Judge(net, C, A, losses)


@dataclass
class JudgeAccuracy:
    """The judge on real images it was not trained on."""

    images: int
    class_accuracy: float  # NaN without labels
    attribute_accuracy: torch.Tensor  # (A,) NaN where the attribute is unknown everywhere
    attribute_balanced_accuracy: torch.Tensor  # (A,) mean of the true-positive and true-negative rates


def agree(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of rows where a == b, rows where b is NaN/negative-label left out (NaN if none is left)."""
    keep = ~b.isnan() if b.is_floating_point() else b >= 0
    return float((a[keep] == b[keep]).float().mean()) if bool(keep.any()) else float("nan")


def judge_accuracy(
    judge: Judge, images: torch.Tensor, labels: Optional[torch.Tensor] = None, attributes: Optional[torch.Tensor] = None
) -> JudgeAccuracy:
    """Class accuracy and per-attribute (balanced) accuracy of the judge on real held-out images."""
    check_judge_data(images, labels, attributes)
    pred = judge.predict(images)
    cls = agree(pred.classes, labels.long().cpu()) if pred.classes is not None and labels is not None else float("nan")
    A = judge.num_attributes
    acc, bal = torch.full((A,), float("nan")), torch.full((A,), float("nan"))
    if A and attributes is not None:
        if attributes.shape[1] != A:
            raise ValueError(f"attributes: {attributes.shape[1]} columns but the judge predicts {A}")
        attrs = attributes.float().cpu()
        for k in range(A):
            acc[k] = agree(pred.attributes[:, k], attrs[:, k])
            rates = [agree(pred.attributes[attrs[:, k] == v, k], attrs[attrs[:, k] == v, k]) for v in (0.0, 1.0)]
            bal[k] = sum(rates) / 2  # NaN when one class is absent
    return JudgeAccuracy(len(images), cls, acc, bal)


class JudgeFeatures(nn.Module):
    """uint8 images -> the judge's pooled features (the `feature` of torchmetrics' FID): a Fréchet
    distance in a space trained on this data, with nothing to download."""

    def __init__(self, judge: Judge):
        super().__init__()
        self.net = judge.net
        self.num_features = self.net.head.in_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        was = self.net.training
        self.net.eval()
        try:
            x = images.to(next(self.net.parameters()).device).float() / 127.5 - 1
            return self.net.features(x).double().cpu()
        finally:
            self.net.train(was)
