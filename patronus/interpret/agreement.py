"""Does a sample decoded from s keep what s says? Sample agreement, the s cycle and sample quality.

1. Sample agreement (`sample_agreement`): decode each reference image's s from fresh noise and
   ask the independent judge (`patronus.interpret.judge`, *not* the Patronus encoder) whether the
   sample keeps the reference's class and binary attributes:
       class agreement     = P[judge(sample) = judge(reference)]
       label agreement     = P[judge(sample) = true label of the reference]
       attribute agreement = P[judge_a(sample) = judge_a(reference)]   per attribute a
   The judge's own accuracy on real held-out images (`judge_accuracy`) says how far to trust it.
   Two numbers to read it against: `class_probe` on s, the held-out accuracy of a linear probe
   from s to the true class on real images (how much of the class s carries at all: a
   generator that follows s perfectly cannot agree more often than s determines the class;
   the same probe on the pooled pixels says what a linear read of the image itself gets),
   and `sample_quality`, the Fréchet distance between the samples and real held-out images in
   the judge's pooled features (`JudgeFeatures`; guidance that buys agreement with broken
   images shows up here), beside the same distance between two sets of real images of the same
   size (the floor at that sample count).
2. s cycle (same call): re-encode the samples;
       s_cycle = mean_J Pearson_i(s_ref[i, J], s_gen[i, J])
   over all (reference, sample) pairs (a reference with R samples counts R times); prototypes
   whose activation is constant over the references or the samples have no correlation (NaN)
   and are left out of the mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from patronus.interpret.generation_metrics import fid_kid, to_uint8
from patronus.interpret.judge import Judge, JudgeFeatures, agree, check_judge_data
from patronus.interpret.quality import fit_logistic, predict_proba, standardise
from patronus.pipeline import PatronusPipeline

PROBE_PIXELS = 16  # side of the pooled images the pixel probe reads


def class_probe(train: torch.Tensor, train_labels: torch.Tensor, held: torch.Tensor, held_labels: torch.Tensor) -> float:
    """Accuracy on held-out rows (N, D) of a linear (multinomial logistic) probe fitted on training
    rows (M, D); unlabelled rows (label < 0) are left out. From s: how much of the class s carries
    (the ceiling of class agreement for any generator). From `probe_pixels`: what a linear read of
    the image itself gets, the reference to read s against. Fitted on the judge's training images
    (thousands), not on folds of the held-out set: fitted on a few hundred rows, 30 weights per
    class read low (Fashion-MNIST 0.76 against 0.80)."""
    tr, he = train_labels >= 0, held_labels >= 0
    x_tr, y_tr = train[tr].float().cpu(), train_labels[tr].long().cpu()
    x_he, y_he = held[he].float().cpu(), held_labels[he].long().cpu()
    if len(y_tr) < 2 or y_tr.unique().numel() < 2 or len(y_he) == 0:
        raise ValueError(
            f"labels: {len(y_tr)} labelled training rows of {y_tr.unique().numel()} class(es) and {len(y_he)} labelled "
            "held-out rows; the probe needs ≥ 2 classes to fit and ≥ 1 row to score"
        )
    n_cls = int(max(y_tr.max(), y_he.max())) + 1
    x_tr, x_he = standardise(x_tr, x_he)
    w = fit_logistic(x_tr, y_tr, n_cls)
    return float((predict_proba(w, x_he).argmax(1) == y_he).double().mean())


def probe_pixels(images: torch.Tensor, size: int = PROBE_PIXELS) -> torch.Tensor:
    """Images (N, C, H, W) average-pooled to size × size and flattened: the pixel probe's inputs
    (16 × 16 reads MNIST and Fashion-MNIST as well as 32 × 32 does, at a quarter of the width)."""
    return F.adaptive_avg_pool2d(images.float(), min(size, images.shape[-1])).flatten(1)


def sample_quality(judge: Judge, samples: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
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
    seed: int = 0,
    labels: Optional[torch.Tensor] = None,  # None = no label agreement (NaN)
    attributes: Optional[torch.Tensor] = None,  # None = no attribute label agreement (NaN)
    batch_size: int = 256,
    conditions: Optional[torch.Tensor] = None,  # None = decode the references' own s
) -> SampleAgreement:
    """Decode each reference's s from `samples_per_ref` fresh x_T (one seeded noise stream), judge
    samples against references, and re-encode them for the s cycle.

    `conditions` (B, K): decode these instead of the references' s (a benchmark's ceiling: a model
    conditioned on the true class); the s cycle is then read against them."""
    if samples_per_ref < 1:
        raise ValueError(f"samples_per_ref={samples_per_ref}; expected at least 1")
    if len(references) < 2:
        raise ValueError(f"references: {len(references)} images; a correlation needs at least 2")
    check_judge_data(references, labels, attributes)
    # 1. s_ref = g(x_ref), then R samples x̃ ~ p(x | s_ref) per reference, each from a fresh x_T.
    s_ref = pipe.encode(references).s.cpu() if conditions is None else conditions.float().cpu()
    gen = torch.Generator().manual_seed(seed)
    samples = torch.stack(
        [
            torch.cat([pipe.sample(s_ref[i : i + batch_size], generator=gen, steps=steps).cpu() for i in range(0, len(s_ref), batch_size)])
            for _ in range(samples_per_ref)
        ]
    )
    R, B = samples.shape[:2]
    # 2. s_gen = g(x̃): the samples re-encoded, for the s cycle.
    s_gen = pipe.encode(samples.flatten(0, 1)).s.cpu().view(R, B, -1)
    # 3. The judge on references and samples: class and attribute agreement.
    ref_pred, smp_pred = judge.predict(references), judge.predict(samples.flatten(0, 1))
    nan = float("nan")
    ref_cls = ref_pred.classes
    smp_cls = smp_pred.classes.view(R, B) if smp_pred.classes is not None else None
    class_agreement = float((smp_cls == ref_cls[None]).float().mean()) if ref_cls is not None else nan
    if ref_cls is not None and labels is not None:
        y = labels.long().cpu()
        label_agreement, reference_accuracy = agree(smp_cls.flatten(), y.repeat(R)), agree(ref_cls, y)
    else:
        label_agreement = reference_accuracy = nan
    A = judge.num_attributes
    attr_agree, attr_label = torch.full((A,), nan), torch.full((A,), nan)
    if A:
        ref_a, smp_a = ref_pred.attributes, smp_pred.attributes.view(R, B, A)
        attr_agree = (smp_a == ref_a[None]).float().mean((0, 1))
        if attributes is not None:
            truth = attributes.float().cpu().repeat(R, 1)
            attr_label = torch.tensor([agree(smp_a.reshape(-1, A)[:, k], truth[:, k]) for k in range(A)])
    # 4. s cycle: Pearson_i(s_ref[i, J], s_gen[i, J]), mean over J.
    cyc, per = s_cycle(s_ref, s_gen)
    return SampleAgreement(
        samples, s_ref, s_gen, ref_cls, smp_cls, class_agreement, label_agreement, reference_accuracy, attr_agree, attr_label, cyc, per
    )
