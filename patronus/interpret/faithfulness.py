"""How faithfully does the generator follow s? Measured from outside the Patronus encoder where it can be.

Four measurements, each a pure function (pipeline, tensors) -> dataclass:

1. Sample agreement (`sample_agreement`): decode each reference image's s from fresh noise and
   ask an independent judge — a small CNN trained on real images (`train_judge`), *not* the
   Patronus encoder — whether the sample keeps the reference's class and binary attributes:
       class agreement     = P[judge(sample) = judge(reference)]
       label agreement     = P[judge(sample) = true label of the reference]
       attribute agreement = P[judge_a(sample) = judge_a(reference)]   per attribute a
   The judge's own accuracy on real held-out images (`judge_accuracy`) says how far to trust it.
   Two numbers to read it against: `s_class_probe`, the held-out accuracy of a linear probe
   from s to the true class on real images (how much of the class s carries at all: a
   generator that follows s perfectly cannot agree more often than s determines the class),
   and `sample_quality`, the Fréchet distance between the samples and real held-out images in
   the judge's pooled features (`JudgeFeatures`; guidance that buys agreement with broken
   images shows up here), beside the same distance between two sets of real images of the same
   size (the floor at that sample count).
2. s cycle (same call): re-encode the samples;
       s_cycle = mean_J Pearson_i(s_ref[i, J], s_gen[i, J])
   over all (reference, sample) pairs (a reference with R samples counts R times); prototypes
   whose activation is constant over the references or the samples have no correlation (NaN)
   and are left out of the mean.
3. Edit gain (`edit_gain`): invert the images (fully, or `partial_steps` of the DDIM steps), then
   decode the same latent with s_J set to its q99 (raise) or q01 (lower), one prototype at a time:
       gain_J(i) = (s_J(edited decode_i) − s_J(reconstruction_i)) / (target_J − s_J(reconstruction_i))
   1 = the decode reached the requested value, 0 = no change, < 0 = moved the wrong way (the
   sign convention makes a working lower edit positive too). gain_J = the mean over images i
   whose gap |target_J − s_J(reconstruction_i)| is at least `min_gap` · (q99_J − q01_J) (an
   image already at the target has no gain to measure); `pooled_gain` = Σ_i Δ_i / Σ_i gap_i
   over the same images. Also the mean absolute pixel change |edited − reconstruction| on the
   [-1, 1] scale and the mean |Δs_k| of the prototypes k ≠ J that were not asked to move.
4. Marker causality (`marker_effect`), on data with a planted marker and its masks: raise the
   marker prototype(s) jointly (to q99) on unmarked images and lower them jointly (to q01) on
   marked ones; report the share of decodes where the marker is drawn / is gone. "Drawn" is a
   pixel rule (`marker_detector`) calibrated on real images only:
     * fixed marker position (every marked image's mask is the same): score = mean intensity
       inside that mask;
     * random position: score = the maximum over every marker-sized window (the masks'
       bounding box) of the window's mean intensity;
   threshold = midpoint between the mean score of the real unmarked and of the real marked
   images; a decode has the marker when its score is on the marked side of the threshold
   (intensities are taken with the marker's polarity, so a dark marker works the same way).
   The rates of the plain reconstructions are reported beside them: an inverted latent can
   carry the marker's pixels itself. Two references say what limits the edit (`MarkerReferences`):
     * swap: each marked image's latent decoded under the whole s of a real *unmarked* image of
       its class: the most any s can remove from that latent (measured on the X-ray preset: the marker
       stayed in 96% of such decodes, so 0% removal there is the latent's, not the prototype's);
     * fresh noise: the same raise / lower decoded from fresh x_T beside the same x_T under the
       unedited s: whether the generator reads the marker prototypes at all, no inversion involved.
   Marker prototypes, when not given: `marker_prototypes_by_auroc` — every prototype whose
   single-prototype AUROC for the marker attribute (oriented: firing *more* on marked images,
   since raising it must draw the marker) is ≥ 0.9, else the single best one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from patronus.edits import Edit, apply_edits
from patronus.interpret.generation_metrics import fid_kid, to_uint8
from patronus.interpret.quality import auroc_matrix, fit_logistic, kfold_indices, predict_proba, standardise
from patronus.pipeline import PatronusPipeline

MARKER_AUROC = 0.9  # a prototype with at least this AUROC for the marker attribute is a marker prototype

# --- the judge: an independent classifier ----------------------------------------------------


class JudgeNet(nn.Module):
    """Three 3×3 conv blocks (BN, ReLU; max-pool after the first two), a 4×4 adaptive average
    pool and one linear layer with `num_classes` class logits + `num_attributes` attribute logits."""

    def __init__(self, in_channels: int, num_classes: int, num_attributes: int, width: int = 16):
        super().__init__()
        w = width

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(in_channels, w), nn.MaxPool2d(2), *block(w, 2 * w), nn.MaxPool2d(2),
                                      *block(2 * w, 2 * w), nn.AdaptiveAvgPool2d(4), nn.Flatten())
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
            logits = torch.cat([self.net(images[i : i + batch_size].to(dev).float()).float().cpu()
                                for i in range(0, len(images), batch_size)]) if len(images) else \
                torch.zeros(0, self.num_classes + self.num_attributes)
        finally:
            self.net.train(was)
        C = self.num_classes
        return JudgePrediction(logits[:, :C].argmax(1) if C else None, (logits[:, C:] > 0).float() if self.num_attributes else None)


def _check_judge_data(images: torch.Tensor, labels: Optional[torch.Tensor], attributes: Optional[torch.Tensor]) -> None:
    if images.ndim != 4:
        raise ValueError(f"images: expected (N, C, H, W), got shape {tuple(images.shape)}")
    for name, t in (("labels", labels), ("attributes", attributes)):
        if t is not None and len(t) != len(images):
            raise ValueError(f"{name}: {len(t)} rows for {len(images)} images")
    if attributes is not None and attributes.ndim != 2:
        raise ValueError(f"attributes: expected (N, A), got shape {tuple(attributes.shape)}")


def train_judge(
    images: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    attributes: Optional[torch.Tensor] = None,
    epochs: int = 2,
    seed: int = 0,
    num_classes: Optional[int] = None,
    batch_size: int = 64,
    lr: float = 2e-3,
    width: int = 16,
    device: Optional[torch.device | str] = None,
) -> Judge:
    """Train a small CNN judge (`JudgeNet`) on real images (N, C, H, W) in [-1, 1].

    labels: (N,) long class labels, −1 = unknown (rows left out of the class loss); attributes:
    (N, A) 0/1 with NaN = unknown (left out of that attribute's loss). Cross-entropy + binary
    cross-entropy, Adam, `epochs` passes in a seeded order; deterministic for a seed on the CPU.
    The global RNG is left as it was.
    """
    _check_judge_data(images, labels, attributes)
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


def _agree(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of rows where a == b, rows where b is NaN/negative-label left out (NaN if none is left)."""
    keep = ~b.isnan() if b.is_floating_point() else b >= 0
    return float((a[keep] == b[keep]).float().mean()) if bool(keep.any()) else float("nan")


def judge_accuracy(judge: Judge, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                   attributes: Optional[torch.Tensor] = None) -> JudgeAccuracy:
    """Class accuracy and per-attribute (balanced) accuracy of the judge on real held-out images."""
    _check_judge_data(images, labels, attributes)
    pred = judge.predict(images)
    cls = _agree(pred.classes, labels.long().cpu()) if pred.classes is not None and labels is not None else float("nan")
    A = judge.num_attributes
    acc, bal = torch.full((A,), float("nan")), torch.full((A,), float("nan"))
    if A and attributes is not None:
        if attributes.shape[1] != A:
            raise ValueError(f"attributes: {attributes.shape[1]} columns but the judge predicts {A}")
        attrs = attributes.float().cpu()
        for k in range(A):
            acc[k] = _agree(pred.attributes[:, k], attrs[:, k])
            rates = [_agree(pred.attributes[attrs[:, k] == v, k], attrs[attrs[:, k] == v, k]) for v in (0.0, 1.0)]
            bal[k] = sum(rates) / 2  # NaN when one class is absent
    return JudgeAccuracy(len(images), cls, acc, bal)


# --- 1 + 2. sample agreement and the s cycle ---------------------------------------------------


def s_class_probe(s: torch.Tensor, labels: torch.Tensor, folds: int = 5, seed: int = 0) -> float:
    """k-fold held-out accuracy of a linear (multinomial logistic) probe from s (N, K) to the class
    (N,): how much of the class s carries — the ceiling of class agreement for any generator."""
    keep = labels >= 0
    s, y = s[keep].float().cpu(), labels[keep].long().cpu()
    if len(y) < folds or y.unique().numel() < 2:
        raise ValueError(f"labels: {len(y)} labelled images of {y.unique().numel()} class(es); the probe needs ≥ {folds} and ≥ 2")
    n_cls, right = int(y.max()) + 1, 0
    for train, held in kfold_indices(len(y), folds, seed):
        s_tr, s_te = standardise(s[train], s[held])
        w = fit_logistic(s_tr, y[train], n_cls)
        right += int((predict_proba(w, s_te).argmax(1) == y[held]).sum())
    return right / len(y)


class JudgeFeatures(nn.Module):
    """uint8 images -> the judge's pooled features (the `feature` of torchmetrics' FID): a Fréchet
    distance in a space trained on this data, with nothing to download."""

    def __init__(self, judge: "Judge"):
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


def sample_quality(judge: "Judge", samples: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """Fréchet distance (judge features) of the samples (N, C, H, W) to `real` images, and of an
    equally large set of real images (`real`'s first N rows) to the rest of `real` — the floor."""
    n = len(samples)
    if len(real) < n + 2:
        raise ValueError(f"real: {len(real)} images; sample quality needs at least {n + 2} (the samples' count + 2)")
    feature = JudgeFeatures(judge)
    fake = fid_kid(to_uint8(real[n:]), to_uint8(samples), feature)
    floor = fid_kid(to_uint8(real[n:]), to_uint8(real[:n]), feature)
    return {"judge_fid": fake["fid"], "judge_fid_real": floor["fid"], "real_images": len(real) - n, "generated_images": n}


def pearson_per_column(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation (K,) of each column of x (N, K) with the same column of y; NaN where
    either column is constant."""
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"x, y: expected two (N, K) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    den = (x.square().sum(0) * y.square().sum(0)).sqrt()
    r = (x * y).sum(0) / den
    return torch.where(den > 1e-12, r, torch.full_like(r, float("nan"))).float()


def s_cycle(s_ref: torch.Tensor, s_generated: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(mean over prototypes with a defined correlation, per-prototype (K,)) Pearson correlation
    between s_ref (B, K) and the re-encoded samples s_generated (R, B, K), over all R·B pairs."""
    if s_generated.ndim == 2:
        s_generated = s_generated[None]
    if s_generated.shape[1:] != s_ref.shape:
        raise ValueError(f"s_generated: shape {tuple(s_generated.shape)} does not match s_ref {tuple(s_ref.shape)} (R, B, K)")
    R = len(s_generated)
    r = pearson_per_column(s_ref.cpu().repeat(R, 1), s_generated.cpu().reshape(-1, s_ref.shape[1]))
    ok = ~r.isnan()
    return (float(r[ok].mean()) if bool(ok.any()) else float("nan")), r


@dataclass
class SampleAgreement:
    samples: torch.Tensor  # (R, B, C, H, W) R samples per reference, fresh noise each
    s_ref: torch.Tensor  # (B, K)
    s_generated: torch.Tensor  # (R, B, K) the samples re-encoded
    reference_classes: Optional[torch.Tensor]  # (B,) the judge on the references
    sample_classes: Optional[torch.Tensor]  # (R, B) the judge on the samples
    class_agreement: float  # P[judge(sample) = judge(reference)]
    label_agreement: float  # P[judge(sample) = true label] (NaN without labels)
    reference_accuracy: float  # P[judge(reference) = true label]: the ceiling label_agreement is read against
    attribute_agreement: torch.Tensor  # (A,) P[judge_a(sample) = judge_a(reference)]
    attribute_label_agreement: torch.Tensor  # (A,) P[judge_a(sample) = true attribute] (NaN where unknown)
    s_cycle: float
    s_cycle_per_prototype: torch.Tensor  # (K,)


def sample_agreement(
    pipe: PatronusPipeline,
    references: torch.Tensor,
    judge: Judge,
    samples_per_ref: int = 1,
    steps: int = 50,
    guidance: float = 1.0,
    seed: int = 0,
    labels: Optional[torch.Tensor] = None,
    attributes: Optional[torch.Tensor] = None,
    batch_size: int = 256,
    conditions: Optional[torch.Tensor] = None,
) -> SampleAgreement:
    """Decode each reference's s from `samples_per_ref` fresh x_T (one seeded noise stream; CFG
    scale `guidance`), judge samples against references, and re-encode them for the s cycle.

    `conditions` (B, K): decode these instead of the references' s (a benchmark's ceiling: a model
    conditioned on the true class); the s cycle is then read against them."""
    if samples_per_ref < 1:
        raise ValueError(f"samples_per_ref={samples_per_ref}; expected at least 1")
    if len(references) < 2:
        raise ValueError(f"references: {len(references)} images; a correlation needs at least 2")
    _check_judge_data(references, labels, attributes)
    s_ref = pipe.encode(references).s.cpu() if conditions is None else conditions.float().cpu()
    gen = torch.Generator().manual_seed(seed)
    samples = torch.stack([torch.cat([pipe.sample(s_ref[i : i + batch_size], generator=gen, steps=steps, guidance=guidance).cpu()
                                      for i in range(0, len(s_ref), batch_size)]) for _ in range(samples_per_ref)])
    R, B = samples.shape[:2]
    s_gen = pipe.encode(samples.flatten(0, 1)).s.cpu().view(R, B, -1)
    ref_pred, smp_pred = judge.predict(references), judge.predict(samples.flatten(0, 1))
    nan = float("nan")
    ref_cls = ref_pred.classes
    smp_cls = smp_pred.classes.view(R, B) if smp_pred.classes is not None else None
    class_agreement = float((smp_cls == ref_cls[None]).float().mean()) if ref_cls is not None else nan
    if ref_cls is not None and labels is not None:
        y = labels.long().cpu()
        label_agreement, reference_accuracy = _agree(smp_cls.flatten(), y.repeat(R)), _agree(ref_cls, y)
    else:
        label_agreement = reference_accuracy = nan
    A = judge.num_attributes
    attr_agree, attr_label = torch.full((A,), nan), torch.full((A,), nan)
    if A:
        ref_a, smp_a = ref_pred.attributes, smp_pred.attributes.view(R, B, A)
        attr_agree = (smp_a == ref_a[None]).float().mean((0, 1))
        if attributes is not None:
            truth = attributes.float().cpu().repeat(R, 1)
            attr_label = torch.tensor([_agree(smp_a.reshape(-1, A)[:, k], truth[:, k]) for k in range(A)])
    cyc, per = s_cycle(s_ref, s_gen)
    return SampleAgreement(samples, s_ref, s_gen, ref_cls, smp_cls, class_agreement, label_agreement, reference_accuracy,
                           attr_agree, attr_label, cyc, per)


# --- 3. edit gain ---------------------------------------------------------------------------


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

        return {"gain_mean": mean(self.gain), "pooled_gain_mean": mean(self.pooled_gain),
                "pixel_change_mean": mean(self.pixel_change), "off_target_mean": mean(self.off_target),
                "gain": per(self.gain), "pooled_gain": per(self.pooled_gain),
                "counted_images": {str(j): int(v) for j, v in zip(prototypes, self.counted)},
                "target": per(self.target), "pixel_change": per(self.pixel_change), "off_target": per(self.off_target)}


@dataclass
class EditGain:
    prototypes: list[int]
    reconstruction: torch.Tensor  # (B, C, H, W) the latent decoded under the images' own s
    s_reconstruction: torch.Tensor  # (B, K)
    raised: DirectionGain
    lowered: DirectionGain


def _direction(prototypes: Sequence[int], target: torch.Tensor, images: torch.Tensor, s: torch.Tensor,
               recon: torch.Tensor, s_rec: torch.Tensor, span: torch.Tensor, min_gap: float) -> DirectionGain:
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
    pooled = torch.where(n > 0, (delta * counted).sum(1) / pooled_den.where(n > 0, torch.ones_like(pooled_den)),
                         torch.full((P,), float("nan"), dtype=torch.double))
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
    partial_steps: Optional[int] = None,
    edit_guidance: float = 1.0,
    min_gap: float = 0.1,
    batch_size: int = 64,
) -> EditGain:
    """Raise (s_J := levels['max'][J], q99) and lower (s_J := levels['min'][J], q01) each prototype
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
    for name in ("max", "min"):
        if name not in levels:
            raise ValueError(f"levels: missing {name!r} (q99/q01 per prototype, see patronus.interpret.stats.edit_levels)")
    if len(images) < 1:
        raise ValueError("images: expected at least one image")
    hi, lo = levels["max"].float().cpu(), levels["min"].float().cpu()
    edits = [[Edit(j, "set", "max")] for j in prototypes] + [[Edit(j, "set", "min")] for j in prototypes]
    recon, decoded = [], []
    for i in range(0, len(images), batch_size):
        res = pipe.edit(images[i : i + batch_size], edits, steps, partial_steps, levels, guidance=edit_guidance)
        recon.append(res.reconstruction.cpu())
        decoded.append(res.images.cpu())
    recon, decoded = torch.cat(recon), torch.cat(decoded, dim=1)  # (B, ...), (2P, B, ...)
    E, B = decoded.shape[:2]
    s_rec = pipe.encode(recon).s.cpu()
    s_dec = pipe.encode(decoded.flatten(0, 1)).s.cpu().view(E, B, -1)
    P, idx = len(prototypes), torch.tensor(prototypes)
    span = (hi - lo)[idx].clamp_min(1e-8)
    up = _direction(prototypes, hi[idx], decoded[:P], s_dec[:P], recon, s_rec, span, min_gap)
    down = _direction(prototypes, lo[idx], decoded[P:], s_dec[P:], recon, s_rec, span, min_gap)
    return EditGain(prototypes, recon, s_rec, up, down)


# --- 4. marker causality --------------------------------------------------------------------


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
class MarkerDetector:
    """The "is the marker there" pixel rule, calibrated on real images (see the module docstring)."""

    rule: str  # "mask" (fixed position) or "window" (random position)
    mask: Optional[torch.Tensor]  # (1, H, W) the fixed marker mask ("mask" rule)
    window: tuple[int, int]  # marker height, width ("window" rule)
    polarity: float  # +1: the marker is brighter than what it covers, −1: darker
    unmarked_score: float  # mean score of the real unmarked images
    marked_score: float  # mean score of the real marked images
    threshold: float  # their midpoint
    real_accuracy: float  # share of the real calibration images the rule gets right

    def score(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) marker score of images (N, C, H, W), in the marker's polarity."""
        x = self.polarity * images.float().cpu().mean(1, keepdim=True)  # (N, 1, H, W)
        if self.rule == "mask":
            m = self.mask.float()
            return (x * m).flatten(1).sum(1) / m.sum()
        return F.avg_pool2d(x, self.window, stride=1).flatten(1).amax(1)

    def present(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) bool: is the score on the marked side of the threshold."""
        return self.score(images) > self.threshold


def _bbox(mask: torch.Tensor) -> tuple[int, int]:
    rows, cols = mask.flatten(0, -3).amax(0).nonzero(as_tuple=True)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def marker_detector(unmarked: torch.Tensor, marked: torch.Tensor, masks: torch.Tensor) -> MarkerDetector:
    """Calibrate the marker rule on real unmarked images (N, C, H, W), real marked images (M, C, H, W)
    and the marked images' masks (M, 1, H, W)."""
    if len(unmarked) < 1 or len(marked) < 1:
        raise ValueError(f"unmarked/marked: {len(unmarked)} unmarked and {len(marked)} marked images; need at least one of each")
    if masks.shape[0] != len(marked) or masks.shape[-2:] != marked.shape[-2:]:
        raise ValueError(f"masks: shape {tuple(masks.shape)} does not match the marked images {tuple(marked.shape)}")
    masks = masks.float().cpu()
    if not bool((masks.flatten(1).sum(1) > 0).all()):
        raise ValueError("masks: every marked image needs a non-empty marker mask")
    marked, unmarked = marked.float().cpu(), unmarked.float().cpu()
    fixed = bool((masks == masks[:1]).all())
    inside = ((marked.mean(1, keepdim=True) * masks).flatten(1).sum(1) / masks.flatten(1).sum(1)).mean()
    if fixed:
        m = masks[0]
        base = ((unmarked.mean(1, keepdim=True) * m).flatten(1).sum(1) / m.sum()).mean()
    else:
        m, base = None, unmarked.mean()
    polarity = 1.0 if float(inside) >= float(base) else -1.0
    det = MarkerDetector("mask" if fixed else "window", m, _bbox(masks[0]), polarity, 0.0, 0.0, 0.0, float("nan"))
    su, sm = det.score(unmarked), det.score(marked)
    det.unmarked_score, det.marked_score = float(su.mean()), float(sm.mean())
    det.threshold = (det.unmarked_score + det.marked_score) / 2
    det.real_accuracy = float(torch.cat([su <= det.threshold, sm > det.threshold]).float().mean())
    return det


@dataclass
class MarkerRates:
    drawn: float  # share of raised decodes of unmarked images with the marker
    removed: float  # share of lowered decodes of marked images without it
    drawn_in_reconstruction: float  # share of plain reconstructions of unmarked images with a marker (false alarms)
    kept_in_reconstruction: float  # share of plain reconstructions of marked images that keep it


def _share(flags: torch.Tensor) -> float:
    return float(flags.float().mean()) if len(flags) else float("nan")


def marker_rates(detector: MarkerDetector, raised: torch.Tensor, lowered: torch.Tensor,
                 unmarked_reconstruction: torch.Tensor, marked_reconstruction: torch.Tensor) -> MarkerRates:
    """Score decoded images with a calibrated detector (the judgement half of `marker_effect`)."""
    return MarkerRates(_share(detector.present(raised)), _share(~detector.present(lowered)),
                       _share(detector.present(unmarked_reconstruction)), _share(detector.present(marked_reconstruction)))


@dataclass
class MarkerReferences:
    """What bounds the edit, measured beside it (see the module docstring, item 4)."""

    removed_by_swap: float  # marked latents decoded under a real unmarked image's s (its class when known), marker gone
    drawn_from_noise: float  # fresh x_T decoded under the unmarked images' s with the marker prototypes raised
    drawn_from_noise_unedited: float  # the same x_T under their own s
    removed_from_noise: float  # fresh x_T under the marked images' s with the marker prototypes lowered, marker absent
    removed_from_noise_unedited: float  # the same x_T under their own s, marker absent

    def as_dict(self) -> dict[str, float]:
        return dict(vars(self))


def same_class_partners(labels: Optional[torch.Tensor], partner_labels: Optional[torch.Tensor], n: int,
                        m: int) -> torch.Tensor:
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
    partial_steps: Optional[int] = None,
    edit_guidance: float = 1.0,
    detector: Optional[MarkerDetector] = None,
    batch_size: int = 64,
    references: bool = True,
    unmarked_labels: Optional[torch.Tensor] = None,
    marked_labels: Optional[torch.Tensor] = None,
    seed: int = 0,
) -> MarkerEffect:
    """Joint edit of the marker prototypes from the inverted latents: all raised to q99 on the
    unmarked images, all lowered to q01 on the marked ones; judged by `detector` (default: the
    midpoint rule calibrated on these real images, `marker_detector`). `references` also measures
    the swap ceiling and the same edits from fresh noise (`MarkerReferences`; labels pair each marked
    image with an unmarked one of its class for the swap)."""
    prototypes = list(prototypes)
    K = pipe.num_prototypes
    if not prototypes or any(not 0 <= j < K for j in prototypes):
        raise ValueError(f"marker_prototypes {prototypes}: expected one or more of 0..{K - 1}")
    detector = detector if detector is not None else marker_detector(unmarked, marked, masks)
    edit_of = lambda level: [Edit(j, "set", level) for j in prototypes]  # noqa: E731

    def run(x: torch.Tensor, level: str, partner_s: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
        """(reconstructions, edited, the images' own s, their latents decoded under partner_s when given)."""
        rec, out, own_s, swapped = [], [], [], []
        for i in range(0, len(x), batch_size):
            res = pipe.edit(x[i : i + batch_size], [edit_of(level)], steps, partial_steps, levels, guidance=edit_guidance)
            rec.append(res.reconstruction.cpu())
            out.append(res.images[0].cpu())
            own_s.append(res.s)
            if partner_s is not None:
                swapped.append(pipe.decode_edited(res.latent, partner_s[i : i + batch_size], res.s, steps,
                                                  start_step=res.start_step, guidance=edit_guidance).cpu())
        return torch.cat(rec), torch.cat(out), torch.cat(own_s), torch.cat(swapped) if partner_s is not None else torch.empty(0)

    def from_noise(own_s: torch.Tensor, level: str, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        plain, edited = [], []
        for i in range(0, len(own_s), batch_size):
            s = own_s[i : i + batch_size]
            x_T = pipe.noise((len(s), *pipe.image_shape()), seed=seed + offset + i)
            plain.append(pipe.denoise(x_T, s, steps).cpu())
            edited.append(pipe.decode_edited(x_T, apply_edits(s, edit_of(level), levels), s, steps, guidance=edit_guidance,
                                             clip=True).cpu())
        return torch.cat(plain), torch.cat(edited)

    un_rec, raised, s_unmarked, _ = run(unmarked, "max")
    # each marked image's partner for the swap: a real unmarked image of its class
    partners = s_unmarked[same_class_partners(marked_labels, unmarked_labels, len(marked), len(unmarked)).to(s_unmarked.device)]
    mk_rec, lowered, s_marked, swapped = run(marked, "min", partners if references else None)
    rates = marker_rates(detector, raised, lowered, un_rec, mk_rec)
    refs = None
    if references:
        un_plain, un_raised = from_noise(s_unmarked, "max", 0)
        mk_plain, mk_lowered = from_noise(s_marked, "min", len(unmarked))
        refs = MarkerReferences(_share(~detector.present(swapped)), _share(detector.present(un_raised)),
                                _share(detector.present(un_plain)), _share(~detector.present(mk_lowered)),
                                _share(~detector.present(mk_plain)))
    enc = lambda x: pipe.encode(x).s.cpu()[:, prototypes]  # noqa: E731
    return MarkerEffect(prototypes, detector, rates, unmarked.cpu(), un_rec, raised, marked.cpu(), mk_rec, lowered,
                        enc(raised), enc(lowered), enc(un_rec), enc(mk_rec), refs)
