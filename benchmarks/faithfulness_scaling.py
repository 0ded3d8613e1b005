"""Faithfulness against training compute: one run trained longer, `faithfulness` at every checkpoint.

    python benchmarks/faithfulness_scaling.py --name default --max_steps 3600 --every 900
    python benchmarks/faithfulness_scaling.py --name ceiling --ceiling --max_steps 3600 --every 900
    python benchmarks/faithfulness_scaling.py --name snr_off --max_steps 900 --every 900 --set model.snr_gamma=null

Trains `--config` (default: the default run's preset) for `--max_steps` in RUN=runs/scaling/NAME,
keeping a checkpoint every `--every` steps, then runs `python -m patronus faithfulness` on each
checkpoint (class agreement by the independent judge, the s probe, s cycle, edit gain at each
`--edit_guidance` and `--inversion`, judge FID, reconstruction PSNR). `--set KEY=VALUE` passes a
design change to train.py (`--KEY VALUE`). Wall-clock minutes are the checkpoint's age since the
training command started (probes and validation included), so run the script alone on the machine.

`--ceiling` trains the same recipe with the true class (one-hot, zero-padded to K) as the condition
instead of s, and scores the same judge's class agreement on samples from the references' labels:
what a perfect condition reaches at the same compute, i.e. how much is left to s.

Each curve is stored under its name in `--out` (one JSON for every curve; re-running a name
replaces it) and all curves are drawn into `--plot`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from patronus.cli.analyses import main as patronus_main
from patronus.cli.common import Context, DataSource, load_pipeline
from patronus.cli.faithfulness import judged_data
from patronus.cli.train import override_args
from patronus.diffusion import diffusion_loss, distinct_loss
from patronus.interpret.agreement import sample_agreement, sample_quality
from patronus.training.module import PatronusModule

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


class LabelConditioned(PatronusModule):
    """The ceiling: the same recipe, the denoiser conditioned on the one-hot true class (zero-padded
    to K) instead of s. The encoder trains on the distinctness loss alone and is never read."""

    def _loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cond = one_hot(batch["label"], self.net.config.num_prototypes)
        mse, _ = diffusion_loss(self.net, self.scheduler, batch["image"], self.hparams.snr_gamma, s=cond.to(batch["image"]))
        dist = distinct_loss(self.net.encoder.prototypes, self.hparams.distinct_margin)
        return {"loss": mse + self.hparams.distinct_weight * dist, "mse": mse, "distinct": dist, "s_mean": cond.mean()}


def one_hot(labels: torch.Tensor, width: int) -> torch.Tensor:
    if int(labels.max()) >= width:
        raise ValueError(f"the ceiling needs K >= number of classes; K={width}, a label {int(labels.max())}")
    return F.one_hot(labels.long(), width).float()


def train(name: str, config: str, max_steps: int, every: int, overrides: list[str], ceiling: bool) -> tuple[Path, Optional[float]]:
    """Train (or resume; a finished run is not touched) runs/scaling/NAME in a subprocess; returns
    (run dir, the time its training first started, None if unknown)."""
    run = REPO / "runs" / "scaling" / name
    args = [
        "--config",
        config,
        "--run_dir",
        str(run),
        "--trainer.max_steps",
        str(max_steps),
        "--checkpoint.every_n_train_steps",
        str(every),
        "--checkpoint.save_top_k",
        "-1",
        "--logger",
        "csv",
    ]
    args += override_args(overrides)
    code = (
        "import sys; from patronus.cli.train import train_main; "
        + (
            f"sys.path.insert(0, {str(HERE)!r}); from faithfulness_scaling import LabelConditioned as M; "
            if ceiling
            else "from patronus.training.module import PatronusModule as M; "
        )
        + f"train_main({args!r}, model_class=M)"
    )
    # When training started, kept in the run: a resumed or finished run (re-evaluated) keeps its minutes.
    # A run trained before the stamp existed has none: None, and its minutes come from the stored curve.
    stamp = run / "scaling_started_at"
    trained = any(step >= max_steps for step, _ in checkpoints(run))
    if not trained:
        if not stamp.is_file():
            run.mkdir(parents=True, exist_ok=True)
            stamp.write_text(str(time.time()))
        subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    return run, float(stamp.read_text()) if stamp.is_file() else None


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    found = []
    for p in (run / "checkpoints").glob("step*.ckpt"):
        found.append((int(p.stem.removeprefix("step")), p))
    return sorted(found)


def ceiling_point(ckpt: Path, num_images: int, steps: int, judge_images: int, judge_epochs: int) -> dict[str, Any]:
    """Class agreement of samples from the references' true class, by the judge `faithfulness` trains."""
    pipe = load_pipeline(str(ckpt), "cpu")
    ctx = Context(pipe, str(ckpt), ckpt.parent, 0, DataSource())
    data = judged_data(ctx, num_images, judge_images, judge_epochs)
    refs, y = data.held[:num_images], data.labels[:num_images]
    agree = sample_agreement(pipe, refs, data.judge, 1, steps, 0, y, conditions=one_hot(y, pipe.num_prototypes))
    quality = sample_quality(data.judge, agree.samples.flatten(0, 1), data.held)
    return {
        "judge_acc": data.summary["class_accuracy"],
        "class_agreement": agree.class_agreement,
        "label_agreement": agree.label_agreement,
        "judge_fid": quality["judge_fid"],
        "judge_fid_real": quality["judge_fid_real"],
    }


def faithfulness_point(
    ckpt: Path,
    out: Path,
    num_images: int,
    edit_images: int,
    steps: int,
    edit_guidance: list[float],
    inversions: list[str],
    judge_images: int,
    judge_epochs: int,
) -> dict[str, Any]:
    """`faithfulness` for every (inversion, edit guidance); sample agreement once (it does not depend on either)."""
    point: dict[str, Any] = {"edits": {}}
    for inv in inversions:
        for w in edit_guidance:
            res = patronus_main(
                [
                    "faithfulness",
                    "--checkpoint",
                    str(ckpt),
                    "--out",
                    str(out / f"{inv}_e{w:g}"),
                    "--num_images",
                    str(num_images),
                    "--edit_images",
                    str(edit_images),
                    "--steps",
                    str(steps),
                    "--edit_guidance",
                    str(w),
                    "--inversion",
                    inv,
                    "--judge_images",
                    str(judge_images),
                    "--judge_epochs",
                    str(judge_epochs),
                ]
            )
            q = res.get("sample_quality") or {}
            point.update(
                {
                    "judge_acc": res["judge"]["class_accuracy"],
                    "class_agreement": res["agreement"]["class_agreement"],
                    "label_agreement": res["agreement"]["label_agreement"],
                    "s_probe": res["agreement"]["s_class_probe"],
                    "pixel_probe": res["agreement"]["pixel_class_probe"],
                    "s_cycle": res["s_cycle"]["mean"],
                    "judge_fid": q.get("judge_fid"),
                    "judge_fid_real": q.get("judge_fid_real"),
                }
            )
            point["edits"][f"{inv}_e{w:g}"] = {
                "inversion": inv,
                "coupling": res.get("coupling", "alone"),  # measured before couplings existed: alone
                "edit_guidance": w,
                "raise_gain": res["edits"]["raise"]["gain_mean"],
                "lower_gain": res["edits"]["lower"]["gain_mean"],
                "raise_pixels": res["edits"]["raise"]["pixel_change_mean"],
                "reconstruction_psnr_db": res["edits"]["reconstruction_psnr_db_mean"],
            }
    return point


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def markdown(curves: dict[str, Any]) -> str:
    """One row per (curve, checkpoint): the numbers the docs' table quotes."""
    lines = [
        "| curve | step | minutes | class agreement | s probe (pixels) | s cycle | judge FID (real floor) | "
        "raise gain w=1 (inversion, coupling) | lower gain w=1 | recon PSNR dB |",
        "|" + "---|" * 10,
    ]
    for name, curve in curves.items():
        for p in curve["points"]:
            edits = [e for e in p.get("edits", {}).values() if e["edit_guidance"] == 1.0]
            gain = " / ".join(f"{_fmt(e['raise_gain'])} ({e['inversion']}, {e.get('coupling', 'alone')})" for e in edits) or "–"
            lower = " / ".join(_fmt(e["lower_gain"]) for e in edits) or "–"
            psnr = " / ".join(_fmt(e["reconstruction_psnr_db"]) for e in edits) or "–"
            lines.append(
                f"| {name} | {p['step']} | {_fmt(p['minutes'])} | {_fmt(p.get('class_agreement'))} | "
                f"{_probe(p)} | {_fmt(p.get('s_cycle'))} | {_fmt(p.get('judge_fid'))} "
                f"({_fmt(p.get('judge_fid_real'))}) | {gain} | {lower} | {psnr} |"
            )
    return "\n".join(lines)


def _probe(point: dict[str, Any]) -> str:
    """The class probes of a point: s (pixels), fitted on the judge's training images; points not
    re-measured since (2026-12-07) have only the earlier probe, 5 folds of the 1,000 held-out images
    (`s_probe_5fold`)."""
    if point.get("s_probe") is not None:
        return f"{_fmt(point['s_probe'])} ({_fmt(point.get('pixel_probe'))})"
    return f"{_fmt(point.get('s_probe_5fold'))} (5-fold)" if point.get("s_probe_5fold") is not None else "–"


def plot(curves: dict[str, Any], path: Path) -> None:
    from matplotlib import colormaps

    from patronus.plots import render, subplots

    keys = [
        ("class_agreement", "class agreement (judge)"),
        ("s_probe", "s → class probe"),
        ("s_cycle", "s cycle"),
        ("edit", "raise gain, w = 1"),
        ("judge_fid", "judge FID"),
    ]
    fig, axes = subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
    # One colour per curve in every panel and one legend beside them (the curves outnumber tab20).
    palette = [*colormaps["tab20"].colors, *colormaps["tab20b"].colors]
    for i, (name, curve) in enumerate(curves.items()):
        # Against minutes, the measure of a lever (a batch of 32 takes more steps per minute); a point
        # without its minutes (the ceiling run that ran beside other work) is in the table only.
        pts = [p for p in curve["points"] if p.get("minutes") is not None]
        if not pts:
            continue
        x = [p["minutes"] for p in pts]
        color = palette[i % len(palette)]
        # measured before the probe used training images: the earlier probe, dashed
        five_fold = all(p.get("s_probe") is None for p in pts) and any(p.get("s_probe_5fold") is not None for p in pts)
        for ax, (k, title) in zip(axes, keys):
            if k == "edit":  # each curve's own edits (inversion, coupling) are in the table
                for e_name in sorted({e for p in pts for e in p.get("edits", {}) if e.endswith("_e1")}):
                    ax.plot(x, [p["edits"].get(e_name, {}).get("raise_gain") for p in pts], marker="o", color=color)
            elif k == "s_probe" and five_fold:
                ax.plot(x, [p.get("s_probe_5fold") for p in pts], marker="o", ls="--", color=color)
            else:
                ax.plot(x, [p.get(k) for p in pts], marker="o", color=color)
            ax.set(title=title, xlabel="training minutes (2 CPU cores)")
        axes[0].lines[-1].set_label(name + (" (probe 5-fold, dashed)" if five_fold else ""))
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].legend(*axes[0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.03, 0.5), fontsize=7)
    render(fig, path)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", help="the curve's name (runs/scaling/NAME); required unless --report")
    p.add_argument("--config", default="configs/mnist_cpu.yaml")
    p.add_argument("--max_steps", type=int, default=3600)
    p.add_argument("--every", type=int, default=900)
    p.add_argument("--set", nargs="*", default=[], help="train.py overrides KEY=VALUE (a design change)")
    p.add_argument("--ceiling", action="store_true", help="condition on the true class instead of s")
    p.add_argument("--num_images", type=int, default=256)
    p.add_argument("--edit_images", type=int, default=64, help="references whose edits are measured")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--edit_guidance", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--inversion", nargs="+", default=["ddim"], choices=["ddim", "edit_friendly"])
    p.add_argument("--judge_images", type=int, default=10000)
    p.add_argument("--judge_epochs", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "faithfulness_scaling.json"))
    p.add_argument("--plot", default=str(REPO / "docs" / "images" / "faithfulness_scaling.png"))
    p.add_argument("--report", action="store_true", help="only redraw the plot and print the table of --out")
    a = p.parse_args(argv)
    if a.report:
        curves = json.loads(Path(a.out).read_text())
        plot(curves, Path(a.plot))
        print(markdown(curves))
        return curves
    if not a.name:
        p.error("--name is required (or --report)")
    run, t0 = train(a.name, a.config, a.max_steps, a.every, a.set, a.ceiling)
    out = Path(a.out)
    curves = json.loads(out.read_text()) if out.is_file() else {}
    stored = {p["step"]: p.get("minutes") for p in curves.get(a.name, {}).get("points", [])}
    points = []
    for step, ckpt in checkpoints(run):
        minutes = round((ckpt.stat().st_mtime - t0) / 60, 2) if t0 is not None else stored.get(step)
        t = time.perf_counter()
        if a.ceiling:
            point = ceiling_point(ckpt, a.num_images, a.steps, a.judge_images, a.judge_epochs)
        else:
            point = faithfulness_point(
                ckpt,
                run / "analysis" / f"step{step}",
                a.num_images,
                a.edit_images,
                a.steps,
                a.edit_guidance,
                a.inversion,
                a.judge_images,
                a.judge_epochs,
            )
        points.append({"step": step, "minutes": minutes, **point, "eval_seconds": round(time.perf_counter() - t, 1)})
        print(json.dumps(points[-1]), flush=True)
    curves[a.name] = {
        "command": "python benchmarks/faithfulness_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": a.config,
        "max_steps": a.max_steps,
        "set": a.set,
        "ceiling": a.ceiling,
        "date": time.strftime("%Y-%m-%d"),
        "points": points,
    }
    out.write_text(json.dumps(curves, indent=1))
    plot(curves, Path(a.plot))
    print(markdown(curves))
    print(f"wrote {out} and {a.plot}")
    return curves[a.name]


if __name__ == "__main__":
    main()
