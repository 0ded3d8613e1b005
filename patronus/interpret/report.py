"""Assembling the shortcut report: run every piece of evidence on one checkpoint and dataset, then
write it as Markdown + PNG + JSON and, unless switched off, as tables and images in wandb."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")  # no display on servers/CI; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.io import write_png  # noqa: E402

from patronus.interpret.emergence import edit_emergence, emergence_curve_plot  # noqa: E402
from patronus.interpret.figures import heatmap, render  # noqa: E402
from patronus.interpret.information import display_image, prototype_information  # noqa: E402
from patronus.interpret.projection import min_distances, patch_gallery, top_patches  # noqa: E402
from patronus.interpret.shortcut_report import (  # noqa: E402
    LinearProbe,
    association,
    box_hits_mask,
    causal_effect,
    counterfactual_flips,
    finetune_config,
    fit_attribute_probes,
    location_concentration,
    mask_coverage,
    neutralised_decode,
    probe_predictions,
    split_targets,
)
from patronus.models.patronus import PatronusModel  # noqa: E402
from patronus.sampling import noise_like, save_rows  # noqa: E402


def add_report_args(parser: argparse.ArgumentParser) -> None:
    """CLI options of `python -m patronus shortcuts`."""
    parser.add_argument("--targets", nargs="+", help="attributes the task predicts (default: the class label, else all)")
    parser.add_argument("--top", type=int, default=4, help="candidates that get the causal, where and when checks")
    parser.add_argument("--num-refs", type=int, default=16, help="held-out images whose s the causal check samples from")
    parser.add_argument("--flag-threshold", type=float, default=0.1,
                        help="explained-away AUROC above which a prototype is flagged as a shortcut")
    parser.add_argument("--info-timesteps", type=int, default=10, help="quadrature nodes of the information maps")
    parser.add_argument("--info-noise", type=int, default=2, help="ε draws per node of the information maps")
    parser.add_argument("--no-wandb", action="store_true", help="write files only (default: also an offline wandb run)")


def _maps_figure(rows: list[tuple[int, torch.Tensor, torch.Tensor]], path: Path) -> torch.Tensor:
    """One row per prototype: images where it fires with its information map over them."""
    cols = max(len(imgs) for _, imgs, _ in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.2 * cols, 1.3 * len(rows)), squeeze=False)
    for r, (j, imgs, maps) in enumerate(rows):
        vmax = float(maps.max()) or 1.0
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(imgs):
                ax.set_axis_off()
                continue
            ax.imshow(display_image(imgs[c]), cmap="gray", vmin=0, vmax=1)
            ax.imshow(maps[c].float().cpu(), cmap="inferno", vmin=0, vmax=vmax, alpha=0.6, interpolation="nearest")
            if c == 0:
                ax.set_ylabel(f"p{j}", fontsize=8)
    fig.suptitle("where: information maps i(x; s_J | s_−J), median baseline", fontsize=8)
    return render(fig, path)


def _score_figure(score: torch.Tensor, flagged: list[int], path: Path) -> torch.Tensor:
    order = score.argsort(descending=True)[: min(15, len(score))]
    fig, ax = plt.subplots(figsize=(6, 2.8))
    colours = ["tab:red" if int(j) in flagged else "tab:gray" for j in order]
    ax.bar(range(len(order)), score[order].tolist(), color=colours)
    ax.set_xticks(range(len(order)), [f"p{int(j)}" for j in order], fontsize=7)
    ax.set(ylabel="AUROC explained by a confounder", title="shortcut ranking (red: flagged)")
    return render(fig, path)


@torch.no_grad()
def build_report(model: PatronusModel, ds, stats: dict, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every piece of evidence, figures written to `out`; returns the summary (JSON-able)."""
    dev = next(model.parameters()).device
    n = min(args.num_images, len(ds))
    items = [ds[i] for i in range(n)]
    pool = torch.stack([it["image"] for it in items])
    masks = torch.stack([it["marker_mask"] for it in items]) if "marker_mask" in items[0] else None
    labels, attrs, names = ds.labels[:n], ds.attributes[:n], list(ds.attribute_names)
    low, high, median = (torch.tensor(v) for v in (stats["min"], stats["max"], stats["quantiles"]["0.5"]))
    K = model.config.num_prototypes

    # 1. Association, explained away (all prototypes, data only).
    dmin, where = min_distances(model, pool)  # (N, K): one pass for the ranking and the boxes
    s = model.encoder.activations_from_distances(dmin)
    t_cols, t_names, c_cols, c_names = split_targets(attrs, names, labels, list(ds.classes), args.targets)
    assoc = association(s, t_cols, t_names, c_cols, c_names)
    concentration = location_concentration(s, where)
    ranking = assoc.ranking()
    top = ranking[: min(args.top, K)]
    flagged = [j for j in ranking if float(assoc.score[j]) >= args.flag_threshold]
    heatmap(torch.cat([assoc.auroc, assoc.confounder_auroc]), xlabels=[f"p{j}" for j in range(K)],
            ylabels=[*t_names, *[f"{c} (confounder?)" for c in c_names]], xlabel="prototype", ylabel="attribute",
            title="single-prototype AUROC", vmin=0.5, vmax=1.0, colorbar_label="AUROC", path=out / "auroc_matrix.png")
    _score_figure(assoc.score, flagged, out / "ranking.png")

    # 2. Probes on a fitting split; mistakes and causal checks on the held-out rest.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    fit, held = perm[: int(0.7 * n)], perm[int(0.7 * n) :]
    all_cols, all_names = torch.cat([t_cols, c_cols], 1), [*t_names, *c_names]
    probes = fit_attribute_probes(s[fit], all_cols[fit])
    has_labels = bool((labels >= 0).all())
    y = labels if has_labels else t_cols[:, 0].nan_to_num(0).long()
    classifier = LinearProbe.fit(s[fit], y[fit], int(y.max()) + 1)
    accuracy = float((classifier.proba(s[held]).argmax(1) == y[held]).float().mean())
    counter = counterfactual_flips(classifier, s[held], y[held], {"low": low, "median": median, "high": high})

    refs = pool[held[: args.num_refs]].to(dev)
    s_refs, x_T = model.encode(refs), noise_like(refs, args.seed)
    causal, causal_rows = [], [refs]
    for j in top:
        effect, x_low, x_high = causal_effect(model, x_T, s_refs, j, float(low[j]), float(high[j]), probes, args.steps)
        causal.append(effect)
        causal_rows += [x_low, x_high]
    save_rows([r[:8] for r in causal_rows], out / "causal.png")

    # 3. Where (boxes on the most activating real patches, information maps) and when.
    hits = top_patches(model, dmin, where, k=8)
    write_png(patch_gallery(pool, [hits[j] for j in top]), str(out / "where_boxes.png"))
    where_rows, per_proto = [], {}
    for j in top:
        idx = [h.image_index for h in hits[j]]
        info = prototype_information(model, pool[idx].to(dev), [j], baseline="median", stats=stats,
                                     num_timesteps=args.info_timesteps, num_noise=args.info_noise, seed=args.seed)
        maps = info.pixel[:, 0].cpu()
        where_rows.append((j, pool[idx], maps))
        entry: dict[str, Any] = {"top_images": idx, "information_nats": info.total[:, 0].tolist()}
        if masks is not None:
            on_marker = [bool(masks[h.image_index].sum() > 0) for h in hits[j]]
            entry["hits_on_confounder_images"] = sum(on_marker) / len(on_marker)
            entry["boxes_on_confounder"] = sum(box_hits_mask(h.box, masks[h.image_index]) for h in hits[j]) / len(hits[j])
            entry["map_mass_on_confounder"], entry["confounder_area"] = mask_coverage(maps, masks[idx])
        per_proto[j] = entry
    _maps_figure(where_rows, out / "where_maps.png")
    emergence = edit_emergence(model, refs[:8], top, high, args.steps)
    emergence_curve_plot(emergence.mean, emergence.std, emergence.timesteps, [f"p{j}" for j in top],
                         out / "when_curves.png", title="when: s_J(x̂0(t) | s_J = high) − s_J(x0)")

    # 4. Mitigation: flagged prototypes held at their median, on held-out images carrying the confounder.
    mitigation: dict[str, Any] = {"prototypes": flagged}
    if flagged:
        j0 = flagged[0]
        conf_col = c_cols[:, int(assoc.confounder_of[j0])] if c_cols.shape[1] else torch.ones(n)
        carriers = held[conf_col[held] == 1][: args.num_refs]
        if len(carriers):
            x0 = pool[carriers].to(dev)
            s_c, xT_c = model.encode(x0), noise_like(x0, args.seed)
            plain = neutralised_decode(model, xT_c, s_c, [], median, args.steps)
            neutral = neutralised_decode(model, xT_c, s_c, flagged, median, args.steps)
            t_idx = int(assoc.target_of[j0])
            before = probe_predictions(probes, model.encode(plain).cpu())[:, t_idx]
            after = probe_predictions(probes, model.encode(neutral).cpu())[:, t_idx]
            mitigation |= {"images": len(carriers), "target": t_names[t_idx], "p_target_before": float(before.mean()),
                           "p_target_after": float(after.mean())}
            if masks is not None:
                m = masks[carriers].to(dev).bool()
                mitigation |= {"confounder_intensity_before": float(plain[m].mean()),
                               "confounder_intensity_after": float(neutral[m].mean()),
                               "confounder_intensity_original": float(x0[m].mean())}
            save_rows([x0[:8], plain[:8], neutral[:8]], out / "mitigation.png")
    checkpoint = getattr(args, "checkpoint", None)
    if flagged and checkpoint:
        (out / "finetune_held.yaml").write_text(finetune_config(flagged, median, str(checkpoint)))

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
        if j in top:
            effect = causal[top.index(j)]
            row |= {"causal_delta": dict(zip(all_names, effect.delta)), "edit_locality": effect.locality,
                    "measured_low": effect.measured_low, "measured_high": effect.measured_high,
                    "emergence_time": float(emergence.times[top.index(j)]),
                    "effect_emergence_time": float(emergence.effect_times[top.index(j)]), **per_proto[j]}
        rows.append(row)
    return {"images": n, "targets": t_names, "candidate_confounders": c_names, "flagged": flagged,
            "classifier_held_out_accuracy": accuracy, "counterfactuals": asdict(counter) | {"fixed_by": None},
            "mitigation": mitigation, "ranking": rows, "has_confounder_masks": masks is not None}


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.{digits}g}"
    return str(v)


def write_markdown(summary: dict[str, Any], out: Path, title: str) -> Path:
    """report.md beside the PNGs it shows."""
    top = [r for r in summary["ranking"] if "causal_delta" in r]
    lines = [f"# Shortcut report: {title}", "",
             f"{summary['images']} images; targets: {', '.join(summary['targets']) or '–'}; "
             f"candidate confounders (not told which, if any): {', '.join(summary['candidate_confounders']) or 'none'}.", "",
             f"**Flagged:** {', '.join(f'p{j}' for j in summary['flagged']) or 'nothing above the threshold'}", "",
             "## Ranking: AUROC for a target that a confounder explains away", "",
             "| rank | prototype | score | target | via | AUROC target | AUROC confounder | φ(target, confounder) | same spot | mistakes fixed by one edit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["ranking"][:10]:
        lines.append(f"| {r['rank']} | p{r['prototype']}{' ⚠' if r['flagged'] else ''} | {_fmt(r['score'])} | {_fmt(r['target'])} | "
                     f"{_fmt(r['confounder'])} | {_fmt(r['auroc_target'])} | {_fmt(r['auroc_confounder'])} | "
                     f"{_fmt(r['phi_target_confounder'])} | {_fmt(r['location_concentration'])} | "
                     f"{_fmt(r['counterfactual_fix_rate'])} ({r['counterfactual_edit']}) |")
    lines += ["", "![ranking](ranking.png)", "", "![AUROC matrix](auroc_matrix.png)", "",
              "## Causal check: raise and suppress, decode, re-probe", "",
              "Rows: held-out images, then per candidate a sample from their s with s_J low and with s_J high (same x_T).", "",
              "| prototype | s_J measured low → high | Δ P(target) | Δ P(confounder) | change inside its box | emerges at t |",
              "|---|---|---|---|---|---|"]
    for r in top:
        d = r["causal_delta"]
        lines.append(f"| p{r['prototype']} | {_fmt(r['measured_low'])} → {_fmt(r['measured_high'])} | "
                     f"{_fmt(d.get(r['target']))} | {_fmt(d.get(r['confounder']))} | {_fmt(r['edit_locality'])} | "
                     f"{_fmt(r['emergence_time'], 4)} |")
    lines += ["", "![causal](causal.png)", "", "## Where and when", "",
              "Most activating real patches of each candidate (receptive-field boxes), information maps over them, "
              "and the emergence curves of the raised prototype.", "",
              "![boxes](where_boxes.png)", "", "![maps](where_maps.png)", "", "![when](when_curves.png)", ""]
    if summary["has_confounder_masks"]:
        lines += ["Scored against the ground-truth confounder masks of the dataset:", "",
                  "| prototype | top patches on confounder images | boxes holding the confounder | map mass on it | its area |",
                  "|---|---|---|---|---|"]
        for r in top:
            lines.append(f"| p{r['prototype']} | {_fmt(r['hits_on_confounder_images'])} | {_fmt(r['boxes_on_confounder'])} | "
                         f"{_fmt(r['map_mass_on_confounder'])} | {_fmt(r['confounder_area'])} |")
        lines.append("")
    c = summary["counterfactuals"]
    lines += ["## Counterfactuals for the classifier's mistakes", "",
              f"A linear classifier on the activations: {_fmt(summary['classifier_held_out_accuracy'])} held-out accuracy, "
              f"{c['mistakes']} mistakes. Examples of one-prototype edits that flip a mistake to the truth: "
              + (", ".join(f"image {e['image']}: p{e['prototype']}→{e['edit']} ({e['from']}→{e['to']})" for e in c["examples"][:6]) or "none"),
              ""]
    m = summary["mitigation"]
    if "images" in m:
        lines += ["## Mitigation: sampling with the flagged prototypes held at their median", "",
                  f"On {m['images']} held-out images carrying the confounder: P({m['target']}) by the probe "
                  f"{_fmt(m['p_target_before'])} → {_fmt(m['p_target_after'])}"
                  + (f"; mean intensity in the confounder region {_fmt(m['confounder_intensity_before'])} → "
                     f"{_fmt(m['confounder_intensity_after'])} (original {_fmt(m['confounder_intensity_original'])})"
                     if "confounder_intensity_before" in m else "") + ".",
                  "", "Rows: originals, samples from their s, the same samples with the flagged prototypes at their median.", "", "![mitigation](mitigation.png)", "",
                  "To fine-tune with them held: `python train.py --config <preset> --config finetune_held.yaml`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def log_to_wandb(summary: dict[str, Any], out: Path, project: str, run_dir: Optional[Path]) -> Optional[str]:
    """The same tables and figures as an offline wandb run (`wandb sync` it later)."""
    import wandb

    run = wandb.init(project=project, dir=str(run_dir or out), mode="offline", job_type="shortcut-report",
                     config={k: summary[k] for k in ("images", "targets", "candidate_confounders", "flagged")})
    keys = ["rank", "prototype", "score", "flagged", "target", "confounder", "auroc_target", "auroc_confounder",
            "location_concentration", "counterfactual_fix_rate"]
    table = wandb.Table(columns=keys, data=[[r[k] for k in keys] for r in summary["ranking"]])
    images = {f"shortcuts/{p.stem}": wandb.Image(str(p)) for p in sorted(out.glob("*.png"))}
    run.log({"shortcuts/ranking": table, **images})
    run.finish()
    return run.dir
