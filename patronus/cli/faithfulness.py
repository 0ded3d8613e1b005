"""`python -m patronus faithfulness`: how faithfully the generator follows s, judged from outside the encoder.

The measurements are pure functions in `patronus.interpret` (their docstrings hold every definition:
`judge`, `agreement`, `edit_gain`, `marker_rule`, `marker_effect`); this module picks the data, trains
the judge on the run's training split, draws the figures (`patronus.plots`) and returns the numbers
(written as faithfulness.json).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from patronus import plots
from patronus.cli.common import STATS_IMAGES, Context, check_positive
from patronus.data.datasets import LabelledImageDataset
from patronus.interpret.agreement import class_probe, probe_pixels, sample_agreement, sample_quality
from patronus.interpret.edit_gain import edit_gain
from patronus.interpret.generation_metrics import psnr
from patronus.interpret.judge import Judge, judge_accuracy, train_judge
from patronus.interpret.marker_effect import MARKER_AUROC, marker_effect, marker_prototypes_by_auroc
from patronus.interpret.stats import edit_levels

FIGURE_COLUMNS = 16  # images per row in the figures
JUDGE_EVAL_IMAGES = 1000  # real held-out images the judge's accuracy is measured on (at least num_images)


def _nan_none(v: float) -> Optional[float]:
    return None if v != v else v


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _json_safe(value: Any) -> Any:
    """NaN -> None everywhere, so faithfulness.json is strict JSON."""
    if isinstance(value, float):
        return _nan_none(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def judge_columns(ds: LabelledImageDataset) -> tuple[list[int], list[str]]:
    """The binary attributes the judge learns: every attribute that is not merely a class indicator
    (MNIST's one-hot digit columns repeat the label) and has both values somewhere."""
    classes = set(ds.classes)
    cols = []
    for k, name in enumerate(ds.attribute_names):
        known = ds.attributes[:, k][~ds.attributes[:, k].isnan()]
        if name not in classes and bool((known == 0).any()) and bool((known == 1).any()):
            cols.append(k)
    return cols, [ds.attribute_names[k] for k in cols]


def _load(ds: LabelledImageDataset, rows: list[int], masks: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    items = [ds[i] for i in rows]
    return torch.stack([it["image"] for it in items]), torch.stack([it["marker_mask"] for it in items]) if masks else None


@dataclass
class JudgedData:
    """The judge, the held-out images it is scored on, and what the class probes are fitted on."""

    judge: Judge
    held: torch.Tensor  # (N, C, H, W) real held-out images
    labels: Optional[torch.Tensor]  # (N,) their classes, where the judge knows classes
    attributes: Optional[torch.Tensor]  # (N, A) their binary attributes the judge learned
    summary: dict[str, Any]
    train_s: torch.Tensor  # (M, K) s of the judge's training images: the class probes' training rows
    train_pixels: torch.Tensor  # (M, D) the same images pooled (`probe_pixels`)
    train_labels: Optional[torch.Tensor]  # (M,)

    def class_probes(self, held_s: torch.Tensor) -> dict[str, Optional[float]]:
        """Held-out accuracy of a linear probe to the class from s (`held_s`, of `held`) and from the
        pooled pixels, both fitted on the judge's training images; None without classes."""
        if self.labels is None or self.train_labels is None:
            return {"s_class_probe": None, "pixel_class_probe": None}
        return {
            "s_class_probe": class_probe(self.train_s, self.train_labels, held_s, self.labels),
            "pixel_class_probe": class_probe(self.train_pixels, self.train_labels, probe_pixels(self.held), self.labels),
        }


def judged_data(ctx: Context, num_images: int, judge_images: int, judge_epochs: int) -> JudgedData:
    """The judge trained on the run's real training split (seeded subset of `judge_images`), the
    held-out images it is scored on (the first max(num_images, JUDGE_EVAL_IMAGES) of the command's
    split), their labels and attributes where the judge knows them, and the judge's summary."""
    ds, train = ctx.dataset(), ctx.dataset("training")
    cols, names = judge_columns(train)
    n_train = min(judge_images, len(train))
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(ctx.seed))[:n_train].sort().values.tolist()
    x_train, _ = _load(train, rows)
    has_labels = bool((train.labels >= 0).any())
    num_classes = (len(train.classes) or int(train.labels.max()) + 1) if has_labels else 0
    judge = train_judge(
        x_train,
        train.labels[rows] if has_labels else None,
        train.attributes[rows][:, cols] if cols else None,
        epochs=judge_epochs,
        seed=ctx.seed,
        num_classes=num_classes or None,
        device=ctx.pipe.device,
    )
    train_s, train_pixels = ctx.pipe.encode(x_train).s, probe_pixels(x_train)
    del x_train
    n_eval = min(len(ds), max(num_images, JUDGE_EVAL_IMAGES))
    held = ctx.images(n_eval)
    labels = ds.labels[:n_eval] if bool((ds.labels[:n_eval] >= 0).any()) and has_labels else None
    same_columns = bool(names) and all(n in ds.attribute_names for n in names)
    attrs = ds.attributes[:n_eval][:, [ds.attribute_names.index(n) for n in names]] if same_columns else None
    acc = judge_accuracy(judge, held, labels, attrs)
    summary = {
        "training_images": n_train,
        "epochs": judge_epochs,
        "training_loss": judge.losses,
        "held_out_images": n_eval,
        "class_accuracy": _nan_none(acc.class_accuracy),
        "attributes": names,
        "attribute_accuracy": {n: _nan_none(float(v)) for n, v in zip(names, acc.attribute_accuracy)},
        "attribute_balanced_accuracy": {n: _nan_none(float(v)) for n, v in zip(names, acc.attribute_balanced_accuracy)},
    }
    return JudgedData(judge, held, labels, attrs, summary, train_s, train_pixels, train.labels[rows] if has_labels else None)


def cmd_faithfulness(
    ctx: Context,
    num_images: int = 256,
    samples_per_ref: int = 1,
    steps: int = 50,
    num_edit_prototypes: int = 4,
    inverted_steps: Optional[int] = None,
    judge_epochs: int = 2,
    marker_prototypes: Union[list[int], int, None] = None,
    judge_images: int = 10000,
    edit_images: Optional[int] = None,
) -> dict:
    """Faithfulness to s: sample agreement by an independent judge, s cycle, edit gain, marker causality.

    Samples from each reference image's s (fresh noise) are judged by a small CNN trained here on
    the run's real training split (not the Patronus encoder): do they keep the reference's class
    and binary attributes? The s cycle is the mean over prototypes of the Pearson correlation
    between s_ref_J and s_J of the re-encoded samples. Edit gain: from the inverted latent, each
    of the most variable prototypes is set to q99 (raise) or q01 (lower);
    gain = (s_J(edit) − s_J(recon)) / (target − s_J(recon)), mean over images (1 = reached, 0 =
    no change). On planted-marker data, the marker prototypes (AUROC ≥ 0.9 for `marker`, else the
    best one) are raised on unmarked and lowered on marked images together; the marker counts as
    drawn when the mean intensity inside the fixed marker mask (random positions: the brightest
    marker-sized window) passes the midpoint between real unmarked and real marked images. Beside
    them: the marked latents decoded under the s of real unmarked images of their class (the most
    any s edit removes from those latents) and the same edits from fresh noise (no inversion).

    Args:
        num_images: reference images (held-out split); also the unmarked and the marked images of the marker check.
        samples_per_ref: fresh-noise samples per reference.
        steps: DDIM steps of sampling, inversion and decoding.
        num_edit_prototypes: the most variable prototypes (std over the statistics) that are raised and lowered.
        inverted_steps: invert only this many of the DDIM steps and edit from there (default: all).
        judge_epochs: training epochs of the judge.
        marker_prototypes: marker prototypes moved together, e.g. [3,7] (default: AUROC ≥ 0.9 for `marker`, else the best).
        judge_images: at most this many training images (a seeded random subset) train the judge.
        edit_images: edit gain on the first N references only (default: all `num_images`); edits cost
            2 × num_edit_prototypes decodes per image, sampling one.
    """
    check_positive(
        num_images=num_images,
        samples_per_ref=samples_per_ref,
        steps=steps,
        num_edit_prototypes=num_edit_prototypes,
        judge_epochs=judge_epochs,
        judge_images=judge_images,
        inverted_steps=inverted_steps,
        edit_images=edit_images,
    )
    pipe = ctx.pipe
    edit_guidance = pipe.edit_guidance  # the common --edit_guidance
    if inverted_steps is not None and inverted_steps > steps:
        raise ValueError(f"inverted_steps={inverted_steps}; expected 1..steps={steps}")
    marker_prototypes = ctx.check_prototypes(marker_prototypes, "marker_prototypes")
    ds = ctx.dataset()
    if len(ds) < 2:
        raise ValueError(f"num_images: the {ds.source['split']} split has {len(ds)} image(s); need at least 2")
    out = ctx.out

    # 1. the judge, on the run's real training split
    data = judged_data(ctx, num_images, judge_images, judge_epochs)
    judge, held, labels, attrs, judge_summary = data.judge, data.held, data.labels, data.attributes, data.summary
    names = judge_summary["attributes"]

    # 2. sample agreement and the s cycle
    refs = held[:num_images]
    B = len(refs)
    agree = sample_agreement(
        pipe,
        refs,
        judge,
        samples_per_ref,
        steps,
        ctx.seed,
        labels[:B] if labels is not None else None,
        attrs[:B] if attrs is not None else None,
    )
    c = min(B, FIGURE_COLUMNS)
    plots.save_rows([refs[:c], *agree.samples[: min(samples_per_ref, 4), :c]], out / "agreement.png")
    attr_agree = agree.attribute_agreement.tolist()
    agreement_summary = {
        "class_agreement": _nan_none(agree.class_agreement),
        "label_agreement": _nan_none(agree.label_agreement),
        "reference_accuracy": _nan_none(agree.reference_accuracy),
        "attribute_agreement": {n: _nan_none(v) for n, v in zip(names, attr_agree)},
        "attribute_agreement_mean": _nan_none(sum(attr_agree) / len(attr_agree)) if attr_agree else None,
        "attribute_label_agreement": {n: _nan_none(float(v)) for n, v in zip(names, agree.attribute_label_agreement)},
        # the ceiling: how much of the class s carries on real held-out images (a linear probe), and
        # the same probe on the pooled pixels: what a linear read of the image itself gets
        **data.class_probes(pipe.encode(held).s),
    }
    samples = agree.samples.flatten(0, 1)
    quality = sample_quality(judge, samples, held) if len(held) >= len(samples) + 2 else None  # else too few real images

    # 3. edit gain of the most variable prototypes
    stats = ctx.statistics()
    levels = edit_levels(stats)
    K = pipe.num_prototypes
    prototypes = torch.tensor(stats["std"]).argsort(descending=True)[: min(num_edit_prototypes, K)].tolist()
    edited = refs[:edit_images] if edit_images is not None else refs
    gain = edit_gain(pipe, edited, prototypes, levels, steps, inverted_steps, edit_guidance)
    for name, d in (("raise", gain.raised), ("lower", gain.lowered)):
        plots.save_rows([refs[:c], gain.reconstruction[:c], *d.images[:, :c]], out / f"edits_{name}.png")

    result: dict[str, Any] = {
        "images": B,
        "samples_per_ref": samples_per_ref,
        "steps": steps,
        "edit_guidance": edit_guidance,
        "inversion": pipe.inversion,
        "coupling": pipe.coupling,
        "inverted_steps": inverted_steps,
        "judge": judge_summary,
        "agreement": agreement_summary,
        "sample_quality": quality,
        "s_cycle": {"mean": _nan_none(agree.s_cycle), "per_prototype": [_nan_none(v) for v in agree.s_cycle_per_prototype.tolist()]},
        "edits": {
            "prototypes": prototypes,
            "raise": gain.raised.summary(prototypes),
            "lower": gain.lowered.summary(prototypes),
            "images": len(edited),
            "reconstruction_psnr_db_mean": _mean(psnr(gain.reconstruction, edited)),
        },
        "marker": None,
    }

    # 4. marker causality, on data with a planted marker and its masks
    if "marker" in ds.attribute_names:
        result["marker"] = (
            _marker(ctx, ds, num_images, marker_prototypes, levels, steps, inverted_steps, edit_guidance)
            if "marker_mask" in ds[0]
            else {"skipped": "the data has a 'marker' attribute but its items carry no marker_mask"}
        )
    return _json_safe(result)


def _marker(
    ctx: Context,
    ds: LabelledImageDataset,
    num_images: int,
    prototypes: Optional[list[int]],
    levels: dict[str, torch.Tensor],
    steps: int,
    inverted_steps: Optional[int],
    edit_guidance: float,
) -> dict[str, Any]:
    column = ds.attributes[:, ds.attribute_names.index("marker")]
    unmarked_rows = (column == 0).nonzero().flatten()[:num_images].tolist()
    marked_rows = (column == 1).nonzero().flatten()[:num_images].tolist()
    if not unmarked_rows or not marked_rows:
        return {"skipped": f"the split has {len(unmarked_rows)} unmarked and {len(marked_rows)} marked images; need both"}
    auroc = None
    chosen = "given"
    if prototypes is None:  # over the statistics images
        n = min(STATS_IMAGES, len(ds))
        s = ctx.pipe.encode(ctx.images(n)).s.cpu()
        prototypes, auc = marker_prototypes_by_auroc(s, column[:n], MARKER_AUROC)
        auroc, chosen = {str(j): _nan_none(float(auc[j])) for j in prototypes}, f"AUROC >= {MARKER_AUROC} for 'marker' (else the best)"
    unmarked, _ = _load(ds, unmarked_rows)
    marked, masks = _load(ds, marked_rows, masks=True)
    labelled = bool((ds.labels >= 0).all())
    eff = marker_effect(
        ctx.pipe,
        unmarked,
        marked,
        masks,
        prototypes,
        levels,
        steps,
        inverted_steps,
        edit_guidance,
        unmarked_labels=ds.labels[unmarked_rows] if labelled else None,
        marked_labels=ds.labels[marked_rows] if labelled else None,
        seed=ctx.seed,
    )
    c = min(len(unmarked), len(marked), FIGURE_COLUMNS)
    plots.save_rows(
        [eff.unmarked[:c], eff.unmarked_reconstruction[:c], eff.raised[:c], eff.marked[:c], eff.marked_reconstruction[:c], eff.lowered[:c]],
        ctx.out / "marker.png",
    )
    det, r = eff.detector, eff.rates
    return {
        "prototypes": prototypes,
        "chosen_by": chosen,
        "prototype_auroc": auroc,
        "unmarked_images": len(unmarked),
        "marked_images": len(marked),
        "drawn_rate": r.drawn,
        "removed_rate": r.removed,
        "drawn_in_reconstruction": r.drawn_in_reconstruction,
        "kept_in_reconstruction": r.kept_in_reconstruction,
        # what bounds the edit: the swap ceiling of the latents, and the same edits from fresh noise
        "references": eff.references.as_dict() if eff.references is not None else None,
        "detector": {
            "rule": det.rule,
            "window": list(det.window),
            "polarity": det.polarity,
            "threshold": det.threshold,
            "real_unmarked_score": det.unmarked_score,
            "real_marked_score": det.marked_score,
            "real_accuracy": det.real_accuracy,
        },
        "s_marker_prototypes": {
            "unmarked_reconstruction": eff.s_unmarked_reconstruction.mean(0).tolist(),
            "raised": eff.s_raised.mean(0).tolist(),
            "marked_reconstruction": eff.s_marked_reconstruction.mean(0).tolist(),
            "lowered": eff.s_lowered.mean(0).tolist(),
            "target_raise": levels["q99"][prototypes].tolist(),
            "target_lower": levels["q01"][prototypes].tolist(),
        },
    }
