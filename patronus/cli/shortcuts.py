"""`python -m patronus shortcuts`: the shortcut report as Markdown, a self-contained report.html,
PNGs and JSON (+ an offline wandb run with the same tables and figures).

The evidence comes from `patronus.interpret.report.build_report` (pure); this module draws its
figures (`patronus.plots`), writes report.md / report.html, the fine-tuning config and the wandb run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from patronus import plots
from patronus.cli.common import Context, DataSource, run_dataset
from patronus.cli.report_html import write_html
from patronus.cli.wandb_runs import linked_run, wants_wandb
from patronus.interpret.report import ReportData, ShortcutReport, build_report
from patronus.interpret.shortcut_report import finetune_config

FIGURES = ("auroc_matrix", "ranking", "causal", "where_boxes", "where_maps", "when_curves", "mitigation", "worst_group", "unexplained")


def cmd_shortcuts(
    ctx: Context,
    targets: Optional[list[str]] = None,
    top: int = 4,
    num_refs: int = 16,
    alpha: float = 0.05,
    permutations: int = 100,
    min_effect: float = 0.1,
    info_timesteps: int = 10,
    info_noise: int = 2,
    num_images: int = 2000,
    steps: int = 25,
    group_split: Optional[str] = None,
) -> dict:
    """Shortcut report: which prototypes carry a confounder, where, when, does editing them change predictions.

    Args:
        targets: attributes the task predicts, e.g. [Smiling] (default: the class label, else all).
        top: causal units (findings first, then the best-ranked other prototypes) that get the causal, where and when checks.
        num_refs: held-out images whose s the causal check and the mitigation sample from.
        alpha: the report's false-alarm rate (chance of flagging anything on data without a shortcut).
        permutations: shuffles per permutation test (at least 1/alpha).
        min_effect: smallest difference in a confounder's rate between a target and the rest that
            counts as a possible shortcut (0.1: ten percentage points); weaker links are named, not flagged.
        info_timesteps: quadrature nodes of the information maps.
        info_noise: noise draws per node of the information maps.
        num_images: images analysed.
        steps: DDIM steps.
        group_split: split on which worst-group accuracy is scored (default: the report's own held-out
            images, whose rare groups are small). A run trained on a planted marker gets it re-planted
            there independently of the target, so every target × marker group is well populated; other
            data is read as is (e.g. a `*_balanced` split written by `shortcut_data --balanced_splits`).
            When it is the report's own split, the images its classifiers were fit on are left out.
            The report also gives each prototype's confounder AUROC on these images ("balanced").
    """
    ds = ctx.dataset()
    groups, same = group_data(ctx, group_split, num_images) if group_split else (None, False)
    report = build_report(
        ctx.pipe,
        ds,
        ctx.statistics(),
        targets=targets,
        top=top,
        num_refs=num_refs,
        alpha=alpha,
        permutations=permutations,
        min_effect=min_effect,
        info_timesteps=info_timesteps,
        info_noise=info_noise,
        steps=steps,
        seed=ctx.seed,
        num_images=num_images,
        group_data=groups,
        group_data_is_report_split=same,
    )
    out = ctx.out
    draw_figures(report, out)
    if report.findings:
        (out / "finetune_held.yaml").write_text(finetune_config(report.findings[0].prototypes, report.neutral[0], str(ctx.checkpoint)))
    summary = dict(report.summary)
    title = f"{ctx.checkpoint} on {ds.source['dataset']} {ds.source['split']}"
    md = write_markdown(summary, out, title)
    summary["report"] = str(md)
    summary["report_html"] = str(
        write_html(
            md.read_text(), summary["verdict"], out, f"Shortcut report: {title}", clear=not (summary["findings"] or summary["unexplained"])
        )
    )
    summary["wandb_dir"] = log_to_wandb(summary, out, ctx.checkpoint) if wants_wandb(ctx.wandb, ctx.checkpoint) else None
    return summary


def _images_of(source: dict[str, Any]) -> tuple:
    """Which images a dataset holds, whatever its split was called ("validation" may be "test")."""
    return (source.get("dataset"), source.get("root"), source.get("published_split"), source.get("split") if "holdout" in source else None)


def group_data(ctx: Context, split: str, num_images: int) -> tuple[ReportData, bool]:
    """The group-balanced images of `--group_split`, and whether they are the report's own split
    (whose images the report's classifiers were fit on are then left out)."""
    source = DataSource(ctx.data.dataset, ctx.data.root, split, ctx.data.options)
    ds = run_dataset(ctx.checkpoint, ctx.pipe, source, ctx.default_split, group_balanced=True)
    same = _images_of(ds.source) == _images_of(ctx.dataset().source)
    return ReportData.from_dataset(ds, 2 * num_images if same else num_images), same


def draw_figures(report: ShortcutReport, out: Path) -> list[Path]:
    """The report's PNGs in `out` (mitigation, worst_group and unexplained only when there is something to show)."""
    for name in FIGURES:  # a re-run must not leave a stale figure of an earlier report behind
        (out / f"{name}.png").unlink(missing_ok=True)
    assoc, K = report.association, len(report.association.score)
    plots.heatmap(
        torch.cat([assoc.auroc, assoc.confounder_auroc]),
        xlabels=[f"p{j}" for j in range(K)],
        ylabels=[*assoc.target_names, *[f"{c} (confounder?)" for c in assoc.confounder_names]],
        xlabel="prototype",
        ylabel="attribute",
        title="single-prototype AUROC",
        vmin=0.5,
        vmax=1.0,
        colorbar_label="AUROC",
        path=out / "auroc_matrix.png",
    )
    plots.score_figure(assoc.score, report.flagged, out / "ranking.png", threshold=report.flag_test.threshold())
    plots.save_rows([r[:8] for r in report.causal_rows], out / "causal.png")
    plots.save_png(plots.patch_gallery(report.images, report.where_hits), out / "where_boxes.png")
    plots.maps_figure(report.where_maps, out / "where_maps.png")
    em = report.emergence
    plots.emergence_curve_plot(
        em.mean,
        em.std,
        em.timesteps,
        [f"p{j}" for j in report.candidates],
        out / "when_curves.png",
        title="when: s_J(x̂0(t) | s_J = high) − s_J(x0)",
    )
    if report.mitigation_rows:
        plots.save_rows([r[:8] for r in report.mitigation_rows], out / "mitigation.png")
    scored = [f for f in report.summary["findings"] if "before" in f.get("worst_group", {})]
    if scored:
        plots.worst_group_figure(
            [f"{f['confounder']} ({', '.join(f'p{j}' for j in f['prototypes'])})" for f in scored],
            [f["worst_group"]["before"] for f in scored],
            [f["worst_group"]["after"] for f in scored],
            [f["worst_group"]["balanced_training"] for f in scored],
            out / "worst_group.png",
        )
    if report.unexplained:
        u = report.unexplained[0]
        plots.unexplained_figure(
            report.images[0],
            u.effect,
            u.unexplained,
            u.peak,
            f"{u.confounder} vs {u.target}: where images differ and no prototype looks",
            out / "unexplained.png",
        )
    return [out / f"{name}.png" for name in FIGURES if (out / f"{name}.png").is_file()]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.{digits}g}"
    return str(v)


def _findings_markdown(summary: dict[str, Any]) -> list[str]:
    ft = summary["flag_test"]
    lines = [
        "## Findings: one per confounder and position",
        "",
        f"A prototype is flagged only when two permutation tests ({ft['permutations']} shuffles each, family-wise over "
        f"every prototype, target and confounder) both reject: so on data without a shortcut this report flags "
        f"anything with probability ≤ {ft['alpha']:.0%}. Only links where the confounder's rate differs by at least "
        f"{100 * ft['min_effect']:.0f} percentage points between the target and the rest count (`--min_effect`). "
        + (
            f"Score needed this time: {_fmt(ft['score_needed'])}."
            if ft.get("pairs_tested", 1)
            else "No target–confounder pair reached that, so nothing could be flagged."
        ),
        "",
    ]
    weak = [f"- Left out as too weak: {w['sentence']}." for w in summary.get("weak_links", [])]
    lines += weak + ([""] if weak else [])
    if not summary["findings"]:
        return lines + ["Nothing flagged.", ""]
    lines += [
        "| finding | prototypes | target | via | p | marker AUROC best / group / balanced | neutral value from | "
        "marker drawn (raised) | marker removed (neutral) | worst-group acc. before → after (balanced training) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, f in enumerate(summary["findings"], 1):
        r, w = f["marker_rates"], f["worst_group"]
        drawn = f"{_fmt(r.get('drawn'))} (plain {_fmt(r.get('drawn_without_edit'))})" if "drawn" in r else "–"
        removed = f"{_fmt(r.get('removed'))} (plain {_fmt(r.get('removed_without_edit'))})" if "removed" in r else "–"
        wg = (
            f"{_fmt(w['before'])} → {_fmt(w['after'])} ({_fmt(w['balanced_training'])})"
            if "before" in w
            else f"not scored: {w.get('skipped')}"
        )
        lines.append(
            f"| {i} | {', '.join(f'p{j}' for j in f['prototypes'])} | {f['target']} | {f['confounder']} | "
            f"{_fmt(f['p_value'])} | {_fmt(f['auroc_confounder_best'])} / {_fmt(f['auroc_confounder_group'])} / "
            f"{_fmt(f['auroc_confounder_balanced'])} | "
            f"{f['neutral_from']} | {drawn} | {removed} | {wg} |"
        )
    f0 = summary["findings"][0]
    lines += [
        "",
        f"How sure: {f0['sure']}.",
        "",
        f"Marker appearance judged by {f0['marker_rates']['judged_by']}; 'plain' is the same samples without the edit. "
        "Worst-group accuracy: the lowest accuracy of a linear classifier on the activations within any target × "
        "confounder group"
        + (f" (groups present: {', '.join(f0['worst_group']['groups_present'])})" if "groups_present" in f0["worst_group"] else "")
        + (f"; the rarest group has {f0['worst_group']['smallest_group']} images" if "smallest_group" in f0["worst_group"] else "")
        + (f"; scored on {f0['worst_group']['scored_on']}" if "scored_on" in f0["worst_group"] else "")
        + f". Members firing where the best one does: {', '.join(f'p{j}' for j in f0['same_position'])}."
        + (
            " Marker AUROC 'balanced': the highest of its members on the worst-group images, where the confounder is independent "
            "of the target; on the report's own images a detector of the target alone scores high when the confounder "
            "goes with it."
            if f0["auroc_confounder_balanced"] is not None
            else ""
        ),
        "",
    ]
    return lines + (
        ["![worst-group accuracy](worst_group.png)", ""] if any("before" in f["worst_group"] for f in summary["findings"]) else []
    )


def _unexplained_markdown(summary: dict[str, Any]) -> list[str]:
    if not summary["unexplained"]:
        return []
    lines = ["## Unexplained signal", ""]
    for u in summary["unexplained"]:
        lines += [
            u["sentence"]
            + (f" The ground-truth masks are densest at (row {u['mask_peak'][0]}, col {u['mask_peak'][1]})." if u["mask_peak"] else ""),
            "",
        ]
    return lines + ["![unexplained](unexplained.png)", ""]


def write_markdown(summary: dict[str, Any], out: Path, title: str) -> Path:
    """report.md beside the PNGs it shows: the verdict first, the evidence below."""
    top = [r for r in summary["ranking"] if "causal_delta" in r]
    lines = [
        f"**{summary['verdict']}**",
        "",
        f"# Shortcut report: {title}",
        "",
        f"{summary['images']} images; targets: {', '.join(summary['targets']) or '–'}; "
        f"candidate confounders (not told which, if any): {', '.join(summary['candidate_confounders']) or 'none'}.",
        "",
        *_findings_markdown(summary),
        *_unexplained_markdown(summary),
        "## Ranking: AUROC for a target that a confounder explains away",
        "",
        "| rank | prototype | score | p | finding | target | via | AUROC target | AUROC confounder (balanced) | φ(target, confounder) | same spot | mistakes fixed by one edit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["ranking"][:10]:
        lines.append(
            f"| {r['rank']} | p{r['prototype']}{' ⚠' if r['flagged'] else ''} | {_fmt(r['score'])} | {_fmt(r['p_value'])} | "
            f"{_fmt(r['finding'])} | {_fmt(r['target'])} | "
            f"{_fmt(r['confounder'])} | {_fmt(r['auroc_target'])} | {_fmt(r['auroc_confounder'])} "
            f"({_fmt(r['auroc_confounder_balanced'])}) | "
            f"{_fmt(r['phi_target_confounder'])} | {_fmt(r['location_concentration'])} | "
            f"{_fmt(r['counterfactual_fix_rate'])} ({r['counterfactual_edit']}) |"
        )
    lines += [
        "",
        "![ranking](ranking.png)",
        "",
        "![AUROC matrix](auroc_matrix.png)",
        "",
        "## Causal check: raise and suppress, decode, re-probe",
        "",
        "Rows: held-out images, then per unit (a whole finding, or one prototype) a sample from their s with the unit "
        "low (a finding: its neutral value) and high (same x_T).",
        "",
        "| unit | s_J measured low → high | Δ P(target) | Δ P(confounder) | change inside its box | emerges at t |",
        "|---|---|---|---|---|---|",
    ]
    for r in top:
        d = r["causal_delta"]
        lines.append(
            f"| {', '.join(f'p{j}' for j in r['causal_unit'])} | {_fmt(r['measured_low'])} → {_fmt(r['measured_high'])} | "
            f"{_fmt(d.get(r['target']))} | {_fmt(d.get(r['confounder']))} | {_fmt(r['edit_locality'])} | "
            f"{_fmt(r['emergence_time'], 4)} |"
        )
    lines += [
        "",
        "![causal](causal.png)",
        "",
        "## Where and when",
        "",
        "Most activating real patches of each candidate (receptive-field boxes), information maps over them, "
        "and the emergence curves of the raised prototype.",
        "",
        "![boxes](where_boxes.png)",
        "",
        "![maps](where_maps.png)",
        "",
        "![when](when_curves.png)",
        "",
    ]
    if summary["has_confounder_masks"]:
        lines += [
            "Scored against the ground-truth confounder masks of the dataset:",
            "",
            "| prototype | top patches on confounder images | boxes holding the confounder | map mass on it | its area |",
            "|---|---|---|---|---|",
        ]
        for r in top:
            lines.append(
                f"| p{r['prototype']} | {_fmt(r['hits_on_confounder_images'])} | {_fmt(r['boxes_on_confounder'])} | "
                f"{_fmt(r['map_mass_on_confounder'])} | {_fmt(r['confounder_area'])} |"
            )
        lines.append("")
    c = summary["counterfactuals"]
    lines += [
        "## Counterfactuals for the classifier's mistakes",
        "",
        f"A linear classifier on the activations: {_fmt(summary['classifier_held_out_accuracy'])} held-out accuracy, "
        f"{c['mistakes']} mistakes. Examples of one-prototype edits that flip a mistake to the truth: "
        + (", ".join(f"image {e['image']}: p{e['prototype']}→{e['edit']} ({e['from']}→{e['to']})" for e in c["examples"][:6]) or "none"),
        "",
    ]
    m = summary["mitigation"]
    if "images" in m:
        lines += [
            "## Mitigation: sampling with the top finding held at its neutral value",
            "",
            f"Neutral value: the median over {m['neutral_from']} (not the dataset median, which is 'confounder present' "
            f"once most images carry it). On {m['images']} held-out images carrying the confounder: P({m['target']}) by the probe "
            f"{_fmt(m['p_target_before'])} → {_fmt(m['p_target_after'])}"
            + (
                f"; mean intensity in the confounder region {_fmt(m['confounder_intensity_before'])} → "
                f"{_fmt(m['confounder_intensity_after'])} (original {_fmt(m['confounder_intensity_original'])})"
                if "confounder_intensity_before" in m
                else ""
            )
            + ".",
            "",
            "Rows: originals, samples from their s, the same samples with the finding at its neutral value.",
            "",
            "![mitigation](mitigation.png)",
            "",
            "To fine-tune with it held: `python train.py --config <preset> --config finetune_held.yaml`.",
            "",
        ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def log_to_wandb(summary: dict[str, Any], out: Path, checkpoint: str) -> Optional[str]:
    """The same tables and figures, `report.html` included, as an offline wandb run (`wandb sync` it
    later) in the group of the training run it audits (`patronus.cli.wandb_runs`)."""
    import wandb

    run = linked_run(
        checkpoint, "shortcut-report", {k: summary[k] for k in ("images", "targets", "candidate_confounders", "flagged", "verdict")}
    )
    keys = [
        "rank",
        "prototype",
        "score",
        "p_value",
        "flagged",
        "finding",
        "target",
        "confounder",
        "auroc_target",
        "auroc_confounder",
        "auroc_confounder_balanced",
        "location_concentration",
        "counterfactual_fix_rate",
    ]
    table = wandb.Table(columns=keys, data=[[r[k] for k in keys] for r in summary["ranking"]])
    fkeys = [
        "prototypes",
        "target",
        "confounder",
        "p_value",
        "auroc_confounder_best",
        "auroc_confounder_group",
        "auroc_confounder_balanced",
        "neutral_from",
        "drawn",
        "removed",
        "worst_group_before",
        "worst_group_after",
        "worst_group_balanced_training",
    ]
    findings = wandb.Table(
        columns=fkeys,
        data=[
            [
                ", ".join(f"p{j}" for j in f["prototypes"]),
                f["target"],
                f["confounder"],
                f["p_value"],
                f["auroc_confounder_best"],
                f["auroc_confounder_group"],
                f["auroc_confounder_balanced"],
                f["neutral_from"],
                f["marker_rates"].get("drawn"),
                f["marker_rates"].get("removed"),
                f["worst_group"].get("before"),
                f["worst_group"].get("after"),
                f["worst_group"].get("balanced_training"),
            ]
            for f in summary["findings"]
        ],
    )
    images = {f"shortcuts/{p.stem}": wandb.Image(str(p), caption=p.stem.replace("_", " ")) for p in sorted(out.glob("*.png"))}
    run.summary.update(
        {
            "shortcuts/verdict": summary["verdict"],
            "shortcuts/flagged": len(summary["flagged"]),
            "shortcuts/findings": len(summary["findings"]),
        }
    )
    report = {"shortcuts/report": wandb.Html(Path(summary["report_html"]).read_text())} if summary.get("report_html") else {}
    run.log(
        {
            "shortcuts/ranking": table,
            "shortcuts/findings_table": findings,
            "shortcuts/verdict_html": wandb.Html(f"<p><b>{summary['verdict']}</b></p>"),
            **report,
            **images,
        }
    )
    run.finish()
    return run.dir
