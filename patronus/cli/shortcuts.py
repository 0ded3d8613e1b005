"""`python -m patronus shortcuts`: the shortcut report as Markdown + PNGs + JSON (+ an offline wandb run).

The evidence comes from `patronus.interpret.report.build_report` (pure); this module draws its
figures (`patronus.plots`), writes report.md, the fine-tuning config and the wandb run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from patronus import plots, runs
from patronus.cli.common import Context
from patronus.interpret.report import ShortcutReport, build_report
from patronus.interpret.shortcut_report import finetune_config

FIGURES = ("auroc_matrix", "ranking", "causal", "where_boxes", "where_maps", "when_curves", "mitigation")


def cmd_shortcuts(
    ctx: Context,
    targets: Optional[list[str]] = None,
    top: int = 4,
    num_refs: int = 16,
    flag_threshold: float = 0.1,
    info_timesteps: int = 10,
    info_noise: int = 2,
    num_images: int = 2000,
    steps: int = 25,
    no_wandb: bool = False,
) -> dict:
    """Shortcut report: which prototype carries a confounder, where, when, does editing it flip predictions.

    Args:
        targets: attributes the task predicts, e.g. [Smiling] (default: the class label, else all).
        top: candidates that get the causal, where and when checks.
        num_refs: held-out images whose s the causal check and the mitigation sample from.
        flag_threshold: explained-away AUROC above which a prototype is flagged as a shortcut.
        info_timesteps: quadrature nodes of the information maps.
        info_noise: noise draws per node of the information maps.
        num_images: images analysed.
        steps: DDIM steps.
        no_wandb: write files only (default: also an offline wandb run).
    """
    ds = ctx.dataset()
    report = build_report(ctx.pipe, ds, ctx.statistics(), targets=targets, top=top, num_refs=num_refs,
                          flag_threshold=flag_threshold, info_timesteps=info_timesteps, info_noise=info_noise,
                          steps=steps, seed=ctx.seed, num_images=num_images)
    out = ctx.out
    draw_figures(report, out)
    if report.flagged:
        (out / "finetune_held.yaml").write_text(finetune_config(report.flagged, report.levels["median"], str(ctx.checkpoint)))
    summary = dict(report.summary)
    summary["report"] = str(write_markdown(summary, out, f"{ctx.checkpoint} on {ds.source['dataset']} {ds.source['split']}"))
    summary["wandb_dir"] = None if no_wandb else log_to_wandb(summary, out, "patronus", runs.analysis_dir(ctx.checkpoint))
    return summary


def draw_figures(report: ShortcutReport, out: Path) -> list[Path]:
    """The report's PNGs in `out` (mitigation.png only when something was mitigated)."""
    assoc, K = report.association, len(report.association.score)
    plots.heatmap(torch.cat([assoc.auroc, assoc.confounder_auroc]), xlabels=[f"p{j}" for j in range(K)],
                  ylabels=[*assoc.target_names, *[f"{c} (confounder?)" for c in assoc.confounder_names]],
                  xlabel="prototype", ylabel="attribute", title="single-prototype AUROC", vmin=0.5, vmax=1.0,
                  colorbar_label="AUROC", path=out / "auroc_matrix.png")
    plots.score_figure(assoc.score, report.flagged, out / "ranking.png")
    plots.save_rows([r[:8] for r in report.causal_rows], out / "causal.png")
    plots.save_png(plots.patch_gallery(report.images, report.where_hits), out / "where_boxes.png")
    plots.maps_figure(report.where_maps, out / "where_maps.png")
    em = report.emergence
    plots.emergence_curve_plot(em.mean, em.std, em.timesteps, [f"p{j}" for j in report.candidates],
                               out / "when_curves.png", title="when: s_J(x̂0(t) | s_J = high) − s_J(x0)")
    if report.mitigation_rows:
        plots.save_rows([r[:8] for r in report.mitigation_rows], out / "mitigation.png")
    return [out / f"{name}.png" for name in FIGURES if (out / f"{name}.png").is_file()]


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
    """The same tables and figures as an offline wandb run (`wandb sync` it later), under `run_dir`
    (the checkpoint's analysis folder) or else `out`."""
    import wandb

    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, dir=str(run_dir or out), mode="offline", job_type="shortcut-report",
                     config={k: summary[k] for k in ("images", "targets", "candidate_confounders", "flagged")})
    keys = ["rank", "prototype", "score", "flagged", "target", "confounder", "auroc_target", "auroc_confounder",
            "location_concentration", "counterfactual_fix_rate"]
    table = wandb.Table(columns=keys, data=[[r[k] for k in keys] for r in summary["ranking"]])
    images = {f"shortcuts/{p.stem}": wandb.Image(str(p)) for p in sorted(out.glob("*.png"))}
    run.log({"shortcuts/ranking": table, **images})
    run.finish()
    return run.dir
