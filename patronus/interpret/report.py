"""Assembling the shortcut report: every piece of evidence of `patronus.interpret.shortcut_report`
run on one pipeline and dataset, as a `ShortcutReport` (a JSON-able summary plus the tensors its
figures need). Pure: nothing is drawn or written here; `python -m patronus shortcuts`
(`patronus.cli.shortcuts`) turns it into Markdown, PNGs, JSON and an offline wandb run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence, Union

import torch

from patronus.data.datasets import LabelledImageDataset
from patronus.interpret.emergence import EditEmergence, edit_emergence
from patronus.interpret.information import prototype_information
from patronus.interpret.projection import PatchHit, top_patches
from patronus.interpret.shortcut_report import (
    Association,
    CausalEffect,
    Counterfactuals,
    LinearProbe,
    association,
    box_hits_mask,
    causal_effect,
    counterfactual_flips,
    fit_attribute_probes,
    location_concentration,
    mask_coverage,
    neutralised_decode,
    probe_predictions,
    split_targets,
)
from patronus.interpret.stats import edit_levels
from patronus.pipeline import PatronusPipeline


@dataclass
class ReportData:
    """The labelled images a report analyses: what it reads of a `LabelledImageDataset`."""

    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    labels: torch.Tensor  # (N,) long, −1 where there is no class
    attributes: torch.Tensor  # (N, A) 1/0, NaN = unknown
    attribute_names: list[str]  # (A,)
    classes: list[str]  # class names (maybe empty)
    masks: Optional[torch.Tensor] = None  # (N, 1, H, W) ground-truth confounder masks, where the data has them

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4 or n == 0:
            raise ValueError(f"images: expected a non-empty (N, C, H, W) batch, got shape {tuple(self.images.shape)}")
        if self.labels.shape != (n,):
            raise ValueError(f"labels: shape {tuple(self.labels.shape)}, expected ({n},) (one per image)")
        if self.attributes.ndim != 2 or len(self.attributes) != n:
            raise ValueError(f"attributes: shape {tuple(self.attributes.shape)}, expected ({n}, A)")
        if len(self.attribute_names) != self.attributes.shape[1]:
            raise ValueError(f"attribute_names: {len(self.attribute_names)} names for {self.attributes.shape[1]} attribute columns")
        if self.masks is not None and len(self.masks) != n:
            raise ValueError(f"masks: {len(self.masks)} masks for {n} images")

    @classmethod
    def from_dataset(cls, ds: LabelledImageDataset, num_images: int) -> "ReportData":
        """The first `num_images` items of `ds` (fewer if it is smaller), with their `marker_mask`s if they carry them."""
        _check_positive(num_images=num_images)
        n = min(num_images, len(ds))
        if n == 0:
            raise ValueError("dataset: it has no images")
        items = [ds[i] for i in range(n)]
        masks = torch.stack([it["marker_mask"] for it in items]) if "marker_mask" in items[0] else None
        return cls(torch.stack([it["image"] for it in items]), ds.labels[:n], ds.attributes[:n],
                   list(ds.attribute_names), list(ds.classes), masks)


@dataclass
class ShortcutReport:
    """Everything the report found: `summary` is what goes to JSON, the rest feeds its figures."""

    summary: dict[str, Any]  # JSON-able: images, targets, candidate_confounders, flagged, ranking, ...
    association: Association  # explained-away scores of all K prototypes
    flagged: list[int]  # prototypes whose score reaches the flag threshold, best first
    candidates: list[int]  # the top-ranked prototypes that got the causal, where and when checks
    levels: dict[str, torch.Tensor]  # "min" / "median" / "max" (K,): the values edits used
    images: torch.Tensor  # (N, C, H, W) the analysed images on the CPU (`where_hits` index into them)
    causal: list[CausalEffect]  # one per candidate
    causal_rows: list[torch.Tensor]  # held-out references, then per candidate its decodes with s_J low and high (CPU)
    where_hits: list[list[PatchHit]]  # per candidate: its most activating real patches
    where_maps: list[tuple[int, torch.Tensor, torch.Tensor]]  # per candidate: (J, those images, information maps (n, H, W))
    emergence: EditEmergence  # the candidates raised to their max, traced while decoding
    counterfactuals: Counterfactuals  # one-prototype edits that fix a linear classifier's mistakes
    mitigation_rows: list[torch.Tensor]  # originals, their samples, the same with the flagged prototypes at their median (CPU; empty if none)


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if v < 1:
            raise ValueError(f"{name}={v}; expected at least 1")


def _levels(stats: dict[str, Any], num_prototypes: int) -> dict[str, torch.Tensor]:
    try:
        levels = edit_levels(stats)
    except (KeyError, TypeError) as e:
        raise ValueError(f"stats: not activation statistics (missing {e}); expected `activation_statistics(...)`") from None
    for name, v in levels.items():
        if v.shape != (num_prototypes,):
            raise ValueError(f"stats: '{name}' has shape {tuple(v.shape)}, expected ({num_prototypes},) for this model")
    return levels


@torch.no_grad()
def build_report(
    pipe: PatronusPipeline,
    data: Union[LabelledImageDataset, ReportData],
    stats: dict[str, Any],
    *,
    targets: Optional[Sequence[str]] = None,
    top: int = 4,
    num_refs: int = 16,
    flag_threshold: float = 0.1,
    info_timesteps: int = 10,
    info_noise: int = 2,
    steps: int = 25,
    seed: int = 0,
    num_images: int = 2000,
) -> ShortcutReport:
    """Every piece of evidence of the shortcut report on the first `num_images` images of `data`.

    Args:
        pipe: the model to examine.
        data: a labelled dataset (items with `marker_mask` make the report score itself) or `ReportData`.
        stats: the activation statistics of `patronus.interpret.stats.activation_statistics` (edit levels).
        targets: attributes the task predicts (default: the class label, else every attribute).
        top: candidates that get the causal, where and when checks.
        num_refs: held-out images whose s the causal check and the mitigation sample from.
        flag_threshold: explained-away AUROC from which a prototype is flagged as a shortcut.
        info_timesteps: quadrature nodes of the information maps.
        info_noise: noise draws per node of the information maps.
        steps: DDIM steps of every decode.
        seed: seed of the fit/held-out split and of every noise draw.
        num_images: images analysed.
    """
    _check_positive(top=top, num_refs=num_refs, info_timesteps=info_timesteps, info_noise=info_noise, steps=steps,
                    num_images=num_images)
    if not isinstance(data, ReportData):
        data = ReportData.from_dataset(data, num_images)
    n = min(num_images, len(data.images))
    pool, masks = data.images[:n].cpu(), data.masks[:n] if data.masks is not None else None
    labels, attrs, names = data.labels[:n], data.attributes[:n], list(data.attribute_names)
    K, dev = pipe.num_prototypes, pipe.device
    levels = _levels(stats, K)
    low, high, median = levels["min"], levels["max"], levels["median"]

    # 1. Association, explained away (all prototypes, data only).
    acts = pipe.encode(pool)  # (N, K) each, on the CPU: one pass for the ranking and the boxes
    s = acts.s
    t_cols, t_names, c_cols, c_names = split_targets(attrs, names, labels, list(data.classes), targets)
    assoc = association(s, t_cols, t_names, c_cols, c_names)
    concentration = location_concentration(s, acts.where)
    ranking = assoc.ranking()
    candidates = ranking[: min(top, K)]
    flagged = [j for j in ranking if float(assoc.score[j]) >= flag_threshold]

    # 2. Probes on a fitting split; mistakes and causal checks on the held-out rest.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, held = perm[: int(0.7 * n)], perm[int(0.7 * n) :]
    all_cols, all_names = torch.cat([t_cols, c_cols], 1), [*t_names, *c_names]
    probes = fit_attribute_probes(s[fit], all_cols[fit])
    has_labels = bool((labels >= 0).all())
    y = labels if has_labels else t_cols[:, 0].nan_to_num(0).long()
    classifier = LinearProbe.fit(s[fit], y[fit], int(y.max()) + 1)
    accuracy = float((classifier.proba(s[held]).argmax(1) == y[held]).float().mean())
    counter = counterfactual_flips(classifier, s[held], y[held], {"low": low, "median": median, "high": high})

    refs = pool[held[:num_refs]].to(dev)
    s_refs, x_T = pipe.encode(refs).s, pipe.noise(refs.shape, seed=seed)
    causal, causal_rows = [], [refs.cpu()]
    for j in candidates:
        effect, x_low, x_high = causal_effect(pipe, x_T, s_refs, j, float(low[j]), float(high[j]), probes, steps)
        causal.append(effect)
        causal_rows += [x_low.cpu(), x_high.cpu()]

    # 3. Where (boxes on the most activating real patches, information maps) and when.
    hits = top_patches(pipe, acts.distances, acts.where, k=8)
    where_maps, per_proto = [], {}
    for j in candidates:
        idx = [h.image_index for h in hits[j]]
        info = prototype_information(pipe, pool[idx].to(dev), [j], baseline="median", stats=stats,
                                     num_timesteps=info_timesteps, num_noise=info_noise, seed=seed)
        maps = info.pixel[:, 0].cpu()
        where_maps.append((j, pool[idx], maps))
        entry: dict[str, Any] = {"top_images": idx, "information_nats": info.total[:, 0].tolist()}
        if masks is not None:
            on_marker = [bool(masks[h.image_index].sum() > 0) for h in hits[j]]
            entry["hits_on_confounder_images"] = sum(on_marker) / len(on_marker)
            entry["boxes_on_confounder"] = sum(box_hits_mask(h.box, masks[h.image_index]) for h in hits[j]) / len(hits[j])
            entry["map_mass_on_confounder"], entry["confounder_area"] = mask_coverage(maps, masks[idx])
        per_proto[j] = entry
    emergence = edit_emergence(pipe, refs[:8], candidates, high, steps)

    # 4. Mitigation: flagged prototypes held at their median, on held-out images carrying the confounder.
    mitigation: dict[str, Any] = {"prototypes": flagged}
    mitigation_rows: list[torch.Tensor] = []
    if flagged:
        j0 = flagged[0]
        conf_col = c_cols[:, int(assoc.confounder_of[j0])] if c_cols.shape[1] else torch.ones(n)
        carriers = held[conf_col[held] == 1][:num_refs]
        if len(carriers):
            x0 = pool[carriers].to(dev)
            s_c, xT_c = pipe.encode(x0).s, pipe.noise(x0.shape, seed=seed)
            plain = neutralised_decode(pipe, xT_c, s_c, [], median, steps)
            neutral = neutralised_decode(pipe, xT_c, s_c, flagged, median, steps)
            t_idx = int(assoc.target_of[j0])
            before = probe_predictions(probes, pipe.encode(plain).s.cpu())[:, t_idx]
            after = probe_predictions(probes, pipe.encode(neutral).s.cpu())[:, t_idx]
            mitigation |= {"images": len(carriers), "target": t_names[t_idx], "p_target_before": float(before.mean()),
                           "p_target_after": float(after.mean())}
            if masks is not None:
                m = masks[carriers].to(dev).bool()
                mitigation |= {"confounder_intensity_before": float(plain[m].mean()),
                               "confounder_intensity_after": float(neutral[m].mean()),
                               "confounder_intensity_original": float(x0[m].mean())}
            mitigation_rows = [x0.cpu(), plain.cpu(), neutral.cpu()]

    # 5. The ranked table.
    rows = []
    for rank, j in enumerate(ranking):
        t, c = int(assoc.target_of[j]), int(assoc.confounder_of[j])
        row = {"rank": rank + 1, "prototype": j, "score": float(assoc.score[j]), "flagged": j in flagged,
               "target": t_names[t] if t_names else None, "confounder": c_names[c] if c_names else None,
               "auroc_target": float(assoc.auroc[t, j]) if t_names else None,
               "auroc_confounder": float(assoc.confounder_auroc[c, j]) if c_names else None,
               "phi_target_confounder": float(assoc.phi[t, c]) if t_names and c_names else None,
               "location_concentration": float(concentration[j]),
               "counterfactual_fix_rate": counter.fixed_by[j], "counterfactual_edit": counter.best_value[j]}
        if j in candidates:
            p = candidates.index(j)
            effect = causal[p]
            row |= {"causal_delta": dict(zip(all_names, effect.delta)), "edit_locality": effect.locality,
                    "measured_low": effect.measured_low, "measured_high": effect.measured_high,
                    "emergence_time": float(emergence.times[p]),
                    "effect_emergence_time": float(emergence.effect_times[p]), **per_proto[j]}
        rows.append(row)
    summary = {"images": n, "targets": t_names, "candidate_confounders": c_names, "flagged": flagged,
               "classifier_held_out_accuracy": accuracy, "counterfactuals": asdict(counter) | {"fixed_by": None},
               "mitigation": mitigation, "ranking": rows, "has_confounder_masks": masks is not None}
    return ShortcutReport(summary, assoc, flagged, candidates, levels, pool, causal, causal_rows,
                          [hits[j] for j in candidates], where_maps, emergence, counter, mitigation_rows)
