"""Assembling the shortcut report: every piece of evidence of `patronus.interpret.shortcut_report`
run on one pipeline and dataset, as a `ShortcutReport` (a JSON-able summary plus the tensors its
figures need). Pure: nothing is drawn or written here; `python -m patronus shortcuts`
(`patronus.cli.shortcuts`) turns it into Markdown, PNGs, JSON and an offline wandb run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import torch

from patronus.data.datasets import LabelledImageDataset
from patronus.edits import set_prototypes
from patronus.interpret.emergence import EditEmergence, edit_emergence
from patronus.interpret.findings import Finding, FlagTest, flag_test, group_findings, neutral_values
from patronus.interpret.information import prototype_information
from patronus.interpret.marker_rule import marker_detector
from patronus.interpret.mitigation import worst_group_scores
from patronus.interpret.projection import PatchHit, top_patches
from patronus.interpret.quality import auroc_matrix
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
    sample_edited,
    split_targets,
)
from patronus.interpret.stats import edit_levels
from patronus.interpret.unexplained import CARRIED_AUROC, Unexplained, WeakLink, best_detector, unexplained_signals, weak_links
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
    def from_dataset(cls, ds: LabelledImageDataset, num_images: int) -> ReportData:
        """The first `num_images` items of `ds` (fewer if it is smaller), with their `marker_mask`s if they carry them."""
        _check_positive(num_images=num_images)
        n = min(num_images, len(ds))
        if n == 0:
            raise ValueError("dataset: it has no images")
        items = [ds[i] for i in range(n)]
        masks = torch.stack([it["marker_mask"] for it in items]) if "marker_mask" in items[0] else None
        return cls(
            torch.stack([it["image"] for it in items]), ds.labels[:n], ds.attributes[:n], list(ds.attribute_names), list(ds.classes), masks
        )


@dataclass
class ShortcutReport:
    """Everything the report found: `summary` is what goes to JSON, the rest feeds its figures."""

    summary: dict[str, Any]  # JSON-able: verdict, findings, images, targets, candidate_confounders, flagged, ranking, ...
    association: Association  # explained-away scores of all K prototypes
    flagged: list[int]  # prototypes flagged by the calibrated test, best first
    findings: list[Finding]  # flagged prototypes grouped: one per confounder and position
    flag_test: FlagTest  # the permutation nulls behind the flags
    candidates: list[int]  # the best prototype of each causal unit (findings first), which got the where and when checks
    levels: dict[str, torch.Tensor]  # "q01" / "median" / "q99" (K,): the values edits used
    neutral: list[torch.Tensor]  # per finding: (K,) neutral values, from images without its confounder
    images: torch.Tensor  # (N, C, H, W) the analysed images on the CPU (`where_hits` index into them)
    causal: list[CausalEffect]  # one per candidate unit
    causal_rows: list[torch.Tensor]  # held-out references, then per unit its decodes with the unit low and high (CPU)
    where_hits: list[list[PatchHit]]  # per candidate: its most activating real patches
    where_maps: list[tuple[int, torch.Tensor, torch.Tensor]]  # per candidate: (J, those images, information maps (n, H, W))
    emergence: EditEmergence  # the candidates raised to their q99, traced while decoding
    counterfactuals: Counterfactuals  # one-prototype edits that fix a linear classifier's mistakes
    mitigation_rows: list[torch.Tensor]  # top finding: originals with the confounder, their samples, the same neutralised (CPU)
    unexplained: list[Unexplained]  # target-linked confounders no prototype carries


# Copied from patronus.cli.common.check_positive (an analysis may not import the command line), without its None pass.
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
        expected = (num_prototypes, num_prototypes) if name == "cov" else (num_prototypes,)
        if name == "activations":  # real images' s (N, K): any N
            expected = (len(v), num_prototypes)
        if v.shape != expected:
            raise ValueError(f"stats: '{name}' has shape {tuple(v.shape)}, expected {expected} for this model")
    return levels


def _marker_judge(
    pool: torch.Tensor,
    masks: Optional[torch.Tensor],
    conf: torch.Tensor,
    rows: torch.Tensor,
    probe: Optional[LinearProbe],
    pipe: PatronusPipeline,
) -> tuple[str, Any]:
    """How "is the confounder in this decoded image" is judged: a pixel rule calibrated on the
    ground-truth masks when the data has them, else the confounder's probe on re-encoded activations."""
    if masks is not None:
        marked, unmarked = rows[conf[rows] == 1], rows[conf[rows] == 0]
        marked = marked[masks[marked].flatten(1).sum(1) > 0]
        if len(marked) and len(unmarked):
            det = marker_detector(pool[unmarked], pool[marked], masks[marked])
            return "pixels inside the ground-truth marker masks", lambda x: det.present(x.cpu())
    if probe is not None:
        return "a probe of the confounder on the decoded images' activations", lambda x: probe.proba(pipe.encode(x).s.cpu())[:, 1] > 0.5
    return "none", None


def confounder_detection(finding: dict[str, Any]) -> float:
    """How well a finding's prototypes detect its confounder: the best of any member's AUROC and the
    group's, sign-free."""
    group = finding["auroc_confounder_group"]
    member = finding.get("auroc_confounder_max", finding["auroc_confounder_best"])
    return max(member, group, 1 - group)


def detects_confounder(finding: dict[str, Any], carried_auroc: float = CARRIED_AUROC) -> bool:
    """Whether a finding's prototypes detect its confounder, rather than only correlating with it through the target."""
    return confounder_detection(finding) >= carried_auroc


def _verdict(
    findings_out: list[dict],
    unexplained: list[Unexplained],
    confounder_names: list[str],
    alpha: float,
    boxes_on_confounder: Optional[float] = None,
    weak: Sequence[WeakLink] = (),
    min_effect: float = 0.1,
    detectors: Optional[dict[str, tuple[int, float]]] = None,
) -> str:
    """The report's first sentence (and, when the top finding's prototypes do not see the confounder
    itself, the second: a flag without a detector is not an explanation). `detectors`: per confounder,
    the prototype that detects it best and its sign-free AUROC, named when it is not the flagged one."""
    if findings_out:
        f = findings_out[0]
        protos = ", ".join(f"p{j}" for j in f["prototypes"])
        more = f" ({len(findings_out)} findings; the strongest)" if len(findings_out) > 1 else ""
        first = (
            f"Shortcut found{more}: {f['target']} is predicted through {f['confounder']}, carried by {protos} "
            f"(p = {f['p_value']:.3g}; false-alarm rate of this report ≤ {alpha:.0%})."
        )
        uncarried = [u for u in unexplained if u.confounder == f["confounder"]]
        if uncarried:
            u = uncarried[0]
            boxes = f"; their boxes sit on it in {boxes_on_confounder:.0%} of their top patches" if boxes_on_confounder is not None else ""
            first += (
                f" But these prototypes do not detect {f['confounder']} itself (best AUROC {u.best_auroc:.2f}{boxes}): "
                f"no prototype explains it; it differs most around pixel (row {u.peak[0]}, col {u.peak[1]}), "
                "see 'Unexplained signal'."
            )
        elif not detects_confounder(f) and f["confounder"] in (detectors or {}):
            # Another prototype sees the confounder, so it is not unexplained, but the flag is not that detector.
            j, auc = detectors[f["confounder"]]
            first += (
                f" But these prototypes do not detect {f['confounder']} itself (AUROC {confounder_detection(f):.2f}); "
                f"p{j} does (AUROC {auc:.2f}) and is not flagged: read this flag as {f['confounder']} going with "
                f"{f['target']} in these images, and see the ranking."
            )
        return first
    if unexplained:
        u = unexplained[0]
        return (
            f"No prototype carries a shortcut, but {u.confounder} separates {u.target} without any prototype explaining it "
            f"(φ = {u.phi:.2f}, best prototype AUROC {u.best_auroc:.2f}): see 'Unexplained signal'."
        )
    if not confounder_names:
        return "Nothing to check: the data has no candidate confounder attributes besides the targets."
    none = (
        f"No shortcut found: no prototype's link to the targets is explained away by {', '.join(confounder_names)} "
        f"beyond chance (false-alarm rate {alpha:.0%})."
    )
    return none + (f" Left out as too weak: {weak[0].sentence(min_effect)}." if weak else "")


@torch.no_grad()
def build_report(
    pipe: PatronusPipeline,
    data: Union[LabelledImageDataset, ReportData],
    stats: dict[str, Any],
    *,
    targets: Optional[Sequence[str]] = None,
    top: int = 4,
    num_refs: int = 16,
    alpha: float = 0.05,
    permutations: int = 100,
    min_effect: float = 0.1,
    info_timesteps: int = 10,
    info_noise: int = 2,
    steps: int = 25,
    seed: int = 0,
    num_images: int = 2000,
    group_data: Optional[ReportData] = None,
    group_data_is_report_split: bool = False,
) -> ShortcutReport:
    """Every piece of evidence of the shortcut report on the first `num_images` images of `data`.

    Args:
        pipe: the model to examine.
        data: a labelled dataset (items with `marker_mask` make the report score itself) or `ReportData`.
        stats: the activation statistics of `patronus.interpret.stats.activation_statistics` (edit levels).
        targets: attributes the task predicts (default: the class label, else every attribute).
        top: causal units (findings first, then the best-ranked other prototypes) that get the causal, where and when checks.
        num_refs: held-out images whose s the causal check and the mitigation sample from.
        alpha: the report's false-alarm rate: the chance it flags anything on data without a shortcut.
        permutations: shuffles per permutation test (at least 1/alpha).
        min_effect: the smallest difference in a confounder's rate between a target and the rest
            that counts as a possible shortcut (flags and unexplained signals); weaker links are
            named in the verdict but not flagged.
        info_timesteps: quadrature nodes of the information maps.
        info_noise: noise draws per node of the information maps.
        steps: DDIM steps of every decode.
        seed: seed of the fit/held-out split, the permutations and every noise draw.
        num_images: images analysed.
        group_data: group-balanced held-out images on which worst-group accuracy is scored (the
            classifiers are still fit on the report's images); default: the report's held-out rest.
        group_data_is_report_split: `group_data` are the same images as `data` (its confounder
            re-planted): the rows the classifiers are fit on are left out of the scoring.
    """
    _check_positive(
        top=top,
        num_refs=num_refs,
        info_timesteps=info_timesteps,
        info_noise=info_noise,
        steps=steps,
        num_images=num_images,
        permutations=permutations,
    )
    if not isinstance(data, ReportData):
        data = ReportData.from_dataset(data, num_images)
    n = min(num_images, len(data.images))
    pool, masks = data.images[:n].cpu(), data.masks[:n].cpu() if data.masks is not None else None
    labels, attrs, names = data.labels[:n], data.attributes[:n], list(data.attribute_names)
    K, dev = pipe.num_prototypes, pipe.device
    levels = _levels(stats, K)
    low, high, median = levels["q01"], levels["q99"], levels["median"]
    enc = pipe.model.encoder
    grid_h, grid_w = enc.feature_shape()
    rf = enc.receptive_field()

    # 1. Association, explained away (all prototypes, data only), and the calibrated flags.
    acts = pipe.encode(pool)  # (N, K) each, on the CPU: one pass for the ranking and the boxes
    s = acts.s
    t_cols, t_names, c_cols, c_names = split_targets(attrs, names, labels, list(data.classes), targets)
    assoc = association(s, t_cols, t_names, c_cols, c_names)
    concentration = location_concentration(s, acts.where)
    ranking = assoc.ranking()
    test = flag_test(s, t_cols, c_cols, alpha, permutations, seed, min_effect)
    flagged = test.flagged
    findings = group_findings(flagged, s, acts.where, test.score, test.p_value, assoc.target_of, assoc.confounder_of, c_cols, grid_w)

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

    group_s, group_t, group_c = None, None, None
    if group_data is not None:
        keep = torch.ones(len(group_data.images), dtype=torch.bool)
        if group_data_is_report_split:
            keep[fit[fit < len(keep)]] = False
        group_s = pipe.encode(group_data.images[keep]).s.cpu()
        gt, gt_names, gc, gc_names = split_targets(
            group_data.attributes[keep], group_data.attribute_names, group_data.labels[keep], group_data.classes, targets
        )
        missing = [c for c in [*t_names, *c_names] if c not in [*gt_names, *gc_names]]
        if missing:
            raise ValueError(f"group_data: has no column for {missing}; expected the report's targets and confounders")
        group_t = {name: gt[:, gt_names.index(name)] for name in gt_names}
        group_c = {name: gc[:, gc_names.index(name)] for name in gc_names}
    # Each prototype's AUROC for each confounder where the confounder is independent of the target:
    # on the report's own images a marker on every positive makes a pure class detector score as a
    # marker detector too (measured in the README, "balanced" AUROC, on the planted-marker X-ray sweep).
    balanced_auroc = auroc_matrix(group_s, torch.stack([group_c[name] for name in c_names], 1)) if group_s is not None and c_names else None

    # 3. Causal units: each finding as a whole (low = its neutral value), then single prototypes.
    neutral = [neutral_values(s, c_cols[:, f.confounder], t_cols[:, f.target]) for f in findings]
    units: list[tuple[list[int], torch.Tensor]] = [(f.prototypes, nv) for f, (nv, _) in zip(findings, neutral)]
    in_findings = {j for f in findings for j in f.prototypes}
    units += [([j], low) for j in ranking if j not in in_findings][: max(0, top - len(units))]
    units = units[: max(top, len(findings))]
    candidates = [u[0][0] for u in units]
    refs = pool[held[:num_refs]].to(dev)
    s_refs, x_T = pipe.encode(refs).s, pipe.noise(refs.shape, seed=seed)
    causal, causal_rows = [], [refs.cpu()]
    for unit, unit_low in units:
        effect, x_low, x_high = causal_effect(pipe, x_T, s_refs, unit, unit_low, high, probes, steps)
        causal.append(effect)
        causal_rows += [x_low.cpu(), x_high.cpu()]

    # 4. Where (boxes on the most activating real patches, information maps) and when.
    hits = top_patches(pipe, acts.distances, acts.where, k=8)
    where_maps, per_proto = [], {}
    for j in candidates:
        idx = [h.image_index for h in hits[j]]
        info = prototype_information(
            pipe, pool[idx].to(dev), [j], baseline="median", stats=stats, num_timesteps=info_timesteps, num_noise=info_noise, seed=seed
        )
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

    # 5. Per finding: does the decoded marker appear / disappear with the group, and what neutralising buys.
    findings_out: list[dict[str, Any]] = []
    mitigation: dict[str, Any] = {"prototypes": findings[0].prototypes if findings else []}
    mitigation_rows: list[torch.Tensor] = []
    for f, (nv, source) in zip(findings, neutral):
        conf, tgt = c_cols[:, f.confounder], t_cols[:, f.target]
        group_score = ((s[:, f.prototypes] - s[:, f.prototypes].mean(0)) / s[:, f.prototypes].std(0).clamp_min(1e-8)).mean(1)
        out: dict[str, Any] = {
            "prototypes": f.prototypes,
            "target": t_names[f.target],
            "confounder": c_names[f.confounder],
            "same_position": f.same_position,
            "score": f.score,
            "p_value": f.p_value,
            "alpha": alpha,
            "permutations": permutations,
            "sure": f"p = {f.p_value:.3g} from {permutations} permutations (family-wise over all prototypes, targets and "
            f"confounders): on data without a shortcut a finding this strong turns up with probability ≤ {f.p_value:.3g}",
            "auroc_confounder_best": float(assoc.confounder_auroc[f.confounder, f.prototypes[0]]),
            "auroc_confounder_max": float(assoc.confounder_auroc[f.confounder, f.prototypes].max()),
            "auroc_confounder_group": float(auroc_matrix(group_score[:, None], conf[:, None])[0, 0]),
            "auroc_confounder_balanced": (float(balanced_auroc[f.confounder, f.prototypes].max()) if balanced_auroc is not None else None),
            "neutral_from": source,
            "neutral": {str(j): float(nv[j]) for j in f.prototypes},
            "dataset_median": {str(j): float(median[j]) for j in f.prototypes},
        }
        known = ~(conf.isnan() | tgt.isnan())
        fit_k, held_k = fit[known[fit]], held[known[held]]
        scored_s, scored_t, scored_c = s[held_k], tgt[held_k], conf[held_k]
        scored_on = f"the report's {len(held_k)} held-out images"
        if group_s is not None:
            g_t, g_c = group_t[t_names[f.target]], group_c[c_names[f.confounder]]
            g_known = ~(g_t.isnan() | g_c.isnan())
            scored_s, scored_t, scored_c = group_s[g_known], g_t[g_known], g_c[g_known]
            scored_on = f"a group-balanced held-out set of {int(g_known.sum())} images"
        try:
            wg = worst_group_scores(s[fit_k], tgt[fit_k], conf[fit_k], scored_s, scored_t, scored_c, f.prototypes, nv, seed)
            out["worst_group"] = wg.as_dict() | {"scored_on": scored_on}
        except ValueError as e:
            out["worst_group"] = {"skipped": str(e)}
        how, judge = _marker_judge(pool, masks, conf, held, probes[len(t_names) + f.confounder], pipe)
        with_c, without_c = held[conf[held] == 1][:num_refs], held[conf[held] == 0][:num_refs]
        rates: dict[str, Any] = {"judged_by": how}
        if judge is not None:
            for name, rows, edit in (("drawn", without_c, high), ("removed", with_c, nv)):
                if not len(rows):
                    continue
                x0 = pool[rows].to(dev)
                s0, xT0 = pipe.encode(x0).s, pipe.noise(x0.shape, seed=seed)
                plain = neutralised_decode(pipe, xT0, s0, [], nv, steps)
                moved = sample_edited(pipe, xT0, set_prototypes(s0, f.prototypes, edit.to(s0)), s0, steps)
                present_plain, present_moved = judge(plain).float(), judge(moved).float()
                if name == "drawn":
                    rates |= {
                        "drawn": float(present_moved.mean()),
                        "drawn_without_edit": float(present_plain.mean()),
                        "images_without": len(rows),
                    }
                else:
                    rates |= {
                        "removed": float(1 - present_moved.mean()),
                        "removed_without_edit": float(1 - present_plain.mean()),
                        "images_with": len(rows),
                    }
                    if f is findings[0]:
                        t_idx = f.target
                        before = probe_predictions(probes, pipe.encode(plain).s.cpu())[:, t_idx]
                        after = probe_predictions(probes, pipe.encode(moved).s.cpu())[:, t_idx]
                        mitigation |= {
                            "images": len(rows),
                            "target": t_names[t_idx],
                            "p_target_before": float(before.mean()),
                            "p_target_after": float(after.mean()),
                            "neutral_from": source,
                        }
                        if masks is not None:
                            m = masks[rows].to(dev).bool()
                            if m.any():
                                mitigation |= {
                                    "confounder_intensity_before": float(plain[m].mean()),
                                    "confounder_intensity_after": float(moved[m].mean()),
                                    "confounder_intensity_original": float(x0[m].mean()),
                                }
                        mitigation_rows = [x0.cpu(), plain.cpu(), moved.cpu()]
        out["marker_rates"] = rates
        findings_out.append(out)

    # 6. Signal no prototype explains.
    boxes = [rf.box(*divmod(c, grid_w)) for c in range(grid_h * grid_w)]
    carried = {c_names[f.confounder] for f, out in zip(findings, findings_out) if detects_confounder(out)}
    unexplained = unexplained_signals(
        pool,
        s,
        acts.where,
        t_cols,
        t_names,
        c_cols,
        c_names,
        assoc.confounder_auroc,
        assoc.auroc,
        carried,
        boxes,
        masks,
        min_effect=min_effect,
    )
    reported = {f["confounder"] for f in findings_out} | {u.confounder for u in unexplained}
    weak = [w for w in weak_links(t_cols, t_names, c_cols, c_names, min_effect) if w.confounder not in reported]

    # 7. The ranked table.
    rows = []
    for rank, j in enumerate(ranking):
        t, c = int(assoc.target_of[j]), int(assoc.confounder_of[j])
        row = {
            "rank": rank + 1,
            "prototype": j,
            "score": float(assoc.score[j]),
            "flagged": j in flagged,
            "p_value": float(test.p_value[j]),
            "finding": next((i + 1 for i, f in enumerate(findings) if j in f.prototypes), None),
            "target": t_names[t] if t_names else None,
            "confounder": c_names[c] if c_names else None,
            "auroc_target": float(assoc.auroc[t, j]) if t_names else None,
            "auroc_confounder": float(assoc.confounder_auroc[c, j]) if c_names else None,
            "auroc_confounder_balanced": float(balanced_auroc[c, j]) if balanced_auroc is not None else None,
            "phi_target_confounder": float(assoc.phi[t, c]) if t_names and c_names else None,
            "location_concentration": float(concentration[j]),
            "counterfactual_fix_rate": counter.fixed_by[j],
            "counterfactual_edit": counter.best_value[j],
        }
        if j in candidates:
            p = candidates.index(j)
            effect = causal[p]
            row |= {
                "causal_delta": dict(zip(all_names, effect.delta)),
                "causal_unit": effect.prototypes,
                "edit_locality": effect.locality,
                "measured_low": effect.measured_low,
                "measured_high": effect.measured_high,
                "emergence_time": float(emergence.times[p]),
                "effect_emergence_time": float(emergence.effect_times[p]),
                **per_proto[j],
            }
        rows.append(row)
    top_boxes = per_proto.get(findings[0].prototypes[0], {}).get("boxes_on_confounder") if findings else None
    detectors = {name: best_detector(assoc.confounder_auroc, c) for c, name in enumerate(c_names)}
    detectors = {name: d for name, d in detectors.items() if d[1] >= CARRIED_AUROC}
    summary = {
        "verdict": _verdict(findings_out, unexplained, c_names, alpha, top_boxes, weak, min_effect, detectors),
        "images": n,
        "targets": t_names,
        "candidate_confounders": c_names,
        "flagged": flagged,
        "findings": findings_out,
        "flag_test": {
            "alpha": alpha,
            "permutations": permutations,
            "min_effect": min_effect,
            "pairs_tested": test.tested_pairs,
            "score_needed": test.threshold(),
            "method": "max-T permutation tests (c shuffled within the target; target shuffled), both must reject",
        },
        "unexplained": [
            {
                "target": u.target,
                "confounder": u.confounder,
                "phi": u.phi,
                "z": u.z,
                "best_prototype": u.best_prototype,
                "best_auroc": u.best_auroc,
                "peak": list(u.peak),
                "peak_effect": u.peak_effect,
                "mask_peak": list(u.mask_peak) if u.mask_peak else None,
                "sentence": u.sentence(),
            }
            for u in unexplained
        ],
        "weak_links": [asdict(w) | {"sentence": w.sentence(min_effect)} for w in weak],
        "classifier_held_out_accuracy": accuracy,
        "counterfactuals": asdict(counter) | {"fixed_by": None},
        "mitigation": mitigation,
        "ranking": rows,
        "has_confounder_masks": masks is not None,
    }
    return ShortcutReport(
        summary,
        assoc,
        flagged,
        findings,
        test,
        candidates,
        levels,
        [nv for nv, _ in neutral],
        pool,
        causal,
        causal_rows,
        [hits[j] for j in candidates],
        where_maps,
        emergence,
        counter,
        mitigation_rows,
        unexplained,
    )
