"""Contamination sweep ("Right for the Wrong Reason", MICCAI 2023): does the shortcut report find a
planted marker as it gets more common in the target class, and stay silent when it is absent?

    python benchmarks/contamination_sweep.py --preset configs/mnist_marker_cpu.yaml --out runs/sweep_mnist
    python benchmarks/contamination_sweep.py --preset configs/pneumoniamnist_marker_cpu.yaml --out runs/sweep_pneumonia
    python benchmarks/contamination_sweep.py --preset configs/mnist_marker_cpu.yaml --levels 0.9 \
        --shapes disc ring cross line glyph --out runs/sweep_shapes
    python benchmarks/contamination_sweep.py --quick --out /tmp/sweep     # tiny runs, minutes (the tests use it)
    python benchmarks/contamination_sweep.py --preset configs/pneumoniamnist_marker_cpu.yaml --levels 0 0.9 \
        --set model.net.prediction=v --out runs/sweep_v       # a design change: train.py's KEY=VALUE

One training run per (shape, level) with the marker on `level` of the target class and `q` of the
rest (the preset's `data.shortcut`, other fields kept), the shortcut report on each (`python -m
patronus shortcuts`), then OUT/sweep.json, OUT/sweep.md (a table) and OUT/sweep.png. Re-running
resumes finished runs. Per run:

  marker_finding_rank   which finding (1 = first) carries the marker; none if no finding does
  marker_auroc          AUROC for the marker of that finding's best prototype (else of the best prototype overall),
                        on the report's images (marker at `level` / `q`)
  marker_auroc_balanced the same prototype's AUROC on the group-balanced held-out set (`--group_split`), where the
                        marker is independent of the target: the one that tells a marker detector from a class
                        detector (at 100% a pure class detector scores high on the report's images)
  box_hit_rate          share of its best prototype's top patches whose box holds the marker
  flagged / findings    prototypes flagged, findings they form
  sensitivity           confounder sensitivity of a linear classifier of the target on the activations:
                        mean |P(target | marker added) − P(target | marker removed)| on the same images
  marker_drawn/removed  the report's causal check on the marker finding: share of decodes where raising the
                        finding draws the marker / the neutral value removes it (judged on the masks), at
                        `--edit_guidance` (re-running with another value re-runs only the reports)
  worst_group_*         the report's worst-group accuracy before / after neutralising / balanced training, on a
                        group-balanced held-out set (`--group_split`, the marker re-planted with p = q = 0.5)
Goals (issue 12): at level 0 nothing is flagged; at ≥ 50% the marker is the first finding with
marker AUROC ≥ 0.95 (the balanced one) and boxes on the marker ≥ 90%.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from patronus import plots, runs
from patronus.cli.analyses import main as patronus_main
from patronus.cli.common import DataSource, load_pipeline, run_dataset
from patronus.cli.train import override_args, train_main
from patronus.data.datasets import SubsetDataset
from patronus.data.shortcuts import PlantedMarker
from patronus.interpret.mitigation import confounder_sensitivity
from patronus.interpret.shortcut_report import LinearProbe

REPO = Path(__file__).resolve().parents[1]
LEVELS = (0.0, 0.2, 0.5, 0.8, 1.0)
QUICK = {  # tiny widths, a few hundred steps: the logic of the sweep, not its numbers
    "preset": REPO / "configs" / "mnist_tiny.yaml",
    "levels": (0.0, 1.0),
    "max_steps": 300,
    "shortcut": {
        "kind": "planted_marker",
        "target": "7",
        "q": 0.05,
        "shape": "square",
        "size": 8,
        "position": [0, 24],
        "intensity": 1.0,
        "seed": 0,
    },
    "report": [
        "--num_images",
        "800",
        "--top",
        "1",
        "--num_refs",
        "4",
        "--steps",
        "5",
        "--info_timesteps",
        "2",
        "--info_noise",
        "1",
        "--permutations",
        "20",
    ],
}
FULL_REPORT = ["--num_images", "2000", "--top", "3", "--num_refs", "16", "--steps", "25"]


def train_run(
    preset: Path, run_dir: Path, shortcut: dict[str, Any], max_steps: Optional[int], quick: bool, overrides: Sequence[str] = ()
) -> float:
    """Train (or resume) one run (`overrides`: train.py's KEY=VALUE, a design or data change); returns the seconds it took."""
    if (run_dir / runs.MODEL_DIR).is_dir():
        return 0.0
    args = ["--config", str(preset), "--run_dir", str(run_dir), "--logger", "none", "--data.shortcut", json.dumps(shortcut)]
    args += override_args(overrides)
    if max_steps:
        args += ["--trainer.max_steps", str(max_steps)]
    if quick:  # no validation grids or monitor probes inside a smoke run
        args += [
            "--trainer.val_check_interval",
            str(max_steps),
            "--interpret_monitor.every_n_steps",
            str(10 * max_steps),
            "--trainer.enable_progress_bar",
            "false",
        ]
    start = time.time()
    train_main(args)
    return time.time() - start


def marked_pairs(ds, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images with the marker, the same without, target indicator) for the first n rows of a planted-marker dataset."""
    base, rows = ds, torch.arange(len(ds))
    if isinstance(ds, SubsetDataset):
        base, rows = ds.base, ds.indices
    if not isinstance(base, PlantedMarker):
        raise ValueError("data: the run's dataset has no planted marker (data.shortcut.kind must be planted_marker)")
    rows = rows[:n]
    pairs = [base.with_and_without(int(i)) for i in rows]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]), base.labels[rows]


def sensitivity(run_dir: Path, target: str, n: int = 600) -> float:
    """Confounder sensitivity of a linear classifier of the target fit on the run's (marked) data."""
    pipe = load_pipeline(str(run_dir), None)
    ds = run_dataset(str(run_dir), pipe, DataSource(split="test"))
    fit = torch.stack([ds[i]["image"] for i in range(min(n, len(ds)))])
    y_fit = _target_column(ds, target)[: len(fit)]
    probe = LinearProbe.fit(pipe.encode(fit).s.cpu(), y_fit)
    with_m, without_m, _ = marked_pairs(SubsetDataset(ds, torch.arange(len(fit), min(2 * n, len(ds)))), n)
    return confounder_sensitivity(probe, pipe.encode(with_m).s.cpu(), pipe.encode(without_m).s.cpu())


def _target_column(ds, target: str) -> torch.Tensor:
    if target in ds.attribute_names and target not in ds.classes:
        return ds.attributes[:, ds.attribute_names.index(target)].nan_to_num(0).long()
    return (ds.labels == (ds.classes.index(target) if target in ds.classes else int(target))).long()


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """The sweep's numbers from one shortcut report's JSON summary (the marker is attribute 'marker')."""
    findings = report["findings"]
    rank = next((i + 1 for i, f in enumerate(findings) if f["confounder"] == "marker"), None)
    by_proto = {r["prototype"]: r for r in report["ranking"]}
    if rank is not None:
        f = findings[rank - 1]
        best, auroc, wg, rates = f["prototypes"][0], f["auroc_confounder_best"], f["worst_group"], f.get("marker_rates") or {}
    else:
        best = max(by_proto, key=lambda j: by_proto[j]["auroc_confounder"] or 0.0)
        auroc, wg, rates = by_proto[best]["auroc_confounder"], {}, {}
    return {
        "marker_finding_rank": rank,
        "marker_auroc": auroc,
        "marker_auroc_balanced": by_proto[best].get("auroc_confounder_balanced"),
        "box_hit_rate": by_proto[best].get("boxes_on_confounder"),
        "flagged": len(report["flagged"]),
        "findings": len(findings),
        "verdict": report["verdict"],
        "marker_drawn": rates.get("drawn"),
        "marker_removed": rates.get("removed"),
        "worst_group_before": wg.get("before"),
        "worst_group_after": wg.get("after"),
        "worst_group_balanced_training": wg.get("balanced_training"),
        "worst_group_smallest": wg.get("smallest_group"),
        "unexplained": [u["confounder"] for u in report["unexplained"]],
        "marker_score": findings[rank - 1]["score"] if rank is not None else None,
        "weak_links": [f"{w['confounder']}~{w['target']}" for w in report.get("weak_links", [])],
    }


def goals_met(row: dict[str, Any]) -> Optional[bool]:
    """Issue 12's goals for one row: nothing flagged at level 0; at ≥ 50% the marker first, AUROC ≥ 0.95 (on the
    group-balanced images: on the report's own, a class detector also scores high when the marker goes with the
    class), boxes ≥ 90%."""
    if row["level"] == 0:
        return row["flagged"] == 0
    if row["level"] >= 0.5:
        return (
            row["marker_finding_rank"] == 1
            and (row.get("marker_auroc_balanced") or 0) >= 0.95
            and row["box_hit_rate"] is not None
            and row["box_hit_rate"] >= 0.9
        )
    return None


COLUMNS = [
    ("shape", "shape"),
    ("size", "size"),
    ("level", "level"),
    ("goals", "goals_met"),
    ("finding rank", "marker_finding_rank"),
    ("marker AUROC", "marker_auroc"),
    ("marker AUROC balanced", "marker_auroc_balanced"),
    ("boxes on marker", "box_hit_rate"),
    ("flagged", "flagged"),
    ("findings", "findings"),
    ("unexplained", "unexplained"),
    ("sensitivity", "sensitivity"),
    ("marker drawn", "marker_drawn"),
    ("marker removed", "marker_removed"),
    ("WGA before", "worst_group_before"),
    ("WGA after", "worst_group_after"),
    ("WGA balanced", "worst_group_balanced_training"),
    ("rarest group", "worst_group_smallest"),
    ("train s", "train_seconds"),
    ("report s", "report_seconds"),
]


def table(rows: list[dict[str, Any]]) -> str:
    fmt = lambda v: (
        "–"
        if v is None or v == []
        # noqa: E731
        else (f"{v:.3g}" if isinstance(v, float) else ", ".join(map(str, v)) if isinstance(v, list) else str(v))
    )
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for _, k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def sweep(
    out: Path,
    preset: Path,
    levels: list[float],
    shapes: list[Optional[str]],
    q: Optional[float],
    max_steps: Optional[int],
    report_args: list[str],
    quick: bool,
    shortcut: Optional[dict] = None,
    size: Optional[int] = None,
    overrides: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Train, report and summarise every (shape, level); writes OUT/sweep.json, sweep.md, sweep.png.
    `shortcut`: fields laid over the preset's `data.shortcut`."""
    base = dict((yaml.safe_load(preset.read_text()).get("data", {}) or {}).get("shortcut") or {}) | dict(shortcut or {})
    if base.get("kind") != "planted_marker":
        raise ValueError(f"preset {preset}: data.shortcut must be a planted_marker (the sweep changes its p)")
    rows = []
    # A finished run is not retrained; its training time is the one the previous sweep.json recorded.
    before = {r["run"]: r for r in json.loads((out / "sweep.json").read_text())} if (out / "sweep.json").is_file() else {}
    for shape in shapes:
        for level in levels:
            spec = {
                **base,
                "p": float(level),
                **({"q": q} if q is not None else {}),
                **({"shape": shape} if shape else {}),
                **({"size": size} if size else {}),
            }
            name = f"{spec.get('shape', 'square')}_p{round(100 * level):03d}"
            run_dir = out / name
            train_s = train_run(preset, run_dir, spec, max_steps, quick, overrides) or (before.get(name) or {}).get("train_seconds") or 0.0
            start = time.time()
            report = patronus_main(["shortcuts", "--checkpoint", str(run_dir), "--data.split", "test", "--wandb", "false", *report_args])
            row = {
                "run": name,
                "shape": spec.get("shape", "square"),
                "size": spec.get("size"),
                "level": float(level),
                "q": spec.get("q"),
                **summarise(report),
                "sensitivity": sensitivity(run_dir, str(spec["target"])),
                "train_seconds": round(train_s, 1),
                "report_seconds": round(time.time() - start, 1),
            }
            row["goals_met"] = goals_met(row)
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    (out / "sweep.md").write_text(table(rows) + "\n")
    for shape in shapes:
        these = [r for r in rows if r["shape"] == (shape or rows[0]["shape"])]
        if len(these) > 1:
            sweep_figure(these, out / f"sweep_{these[0]['shape']}.png")
    return rows


def sweep_figure(rows: list[dict[str, Any]], path: Path) -> Path:
    """The sweep's metrics against the level, one panel each, bounded metrics on their full range."""
    plots.sweep_figure(
        [r["level"] for r in rows],
        {
            "marker AUROC": [r["marker_auroc"] for r in rows],
            "marker AUROC balanced": [r["marker_auroc_balanced"] for r in rows],
            "boxes on marker": [r["box_hit_rate"] for r in rows],
            "prototypes flagged": [float(r["flagged"]) for r in rows],
            "marker finding rank": [float(r["marker_finding_rank"]) if r["marker_finding_rank"] else float("nan") for r in rows],
            "confounder sensitivity": [r["sensitivity"] for r in rows],
        },
        path,
        limits={
            "marker AUROC": (0.5, 1.0),
            "marker AUROC balanced": (0.5, 1.0),
            "boxes on marker": (0.0, 1.0),
            "marker finding rank": (1.0, 5.0),
            "confounder sensitivity": (0.0, 1.0),
        },
    )
    return path


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", type=Path, default=REPO / "configs" / "mnist_marker_cpu.yaml", help="config with a planted_marker shortcut")
    p.add_argument("--out", type=Path, required=True, help="folder for the runs and the summary")
    p.add_argument("--levels", type=float, nargs="+", default=list(LEVELS), help="shares of the target class with the marker")
    p.add_argument("--shapes", nargs="+", default=[None], help="marker shapes (default: the preset's)")
    p.add_argument("--q", type=float, default=None, help="share of the other classes with the marker (default: the preset's)")
    p.add_argument("--size", type=int, default=None, help="marker size in pixels (default: the preset's; a glyph needs ≥ 5)")
    p.add_argument("--max_steps", type=int, default=None, help="training steps per run (default: the preset's)")
    p.add_argument("--quick", action="store_true", help="tiny runs (mnist_tiny widths, 300 steps, levels 0 and 1): for tests")
    p.add_argument(
        "--group_split",
        default="test",
        help="split the report scores worst-group accuracy on, the marker re-planted independently of the target "
        "(default: the report's own split, less the images its classifiers were fit on)",
    )
    p.add_argument(
        "--edit_guidance",
        type=float,
        default=1.0,
        help="edit guidance of the report's causal check (1 = the paper's plain edit; sample.py uses 2)",
    )
    p.add_argument(
        "--shortcut", type=json.loads, default=None, help='JSON fields laid over the preset\'s data.shortcut, e.g. \'{"target": "cat"}\''
    )
    p.add_argument("--set", nargs="*", default=[], help="train.py overrides KEY=VALUE (a design or data change)")
    a = p.parse_args(argv)
    for v in a.levels:
        if not 0 <= v <= 1:
            raise SystemExit(f"error: --levels {v}: expected shares in [0, 1]")
    groups = ["--group_split", a.group_split, "--edit_guidance", str(a.edit_guidance)]
    if a.quick:
        return sweep(
            a.out,
            QUICK["preset"],
            list(QUICK["levels"]),
            a.shapes,
            a.q,
            QUICK["max_steps"],
            QUICK["report"] + groups,
            True,
            shortcut=QUICK["shortcut"] | (a.shortcut or {}),
            overrides=a.set,
        )
    report = FULL_REPORT + groups
    return sweep(a.out, a.preset, a.levels, a.shapes, a.q, a.max_steps, report, False, shortcut=a.shortcut, size=a.size, overrides=a.set)


if __name__ == "__main__":
    main()
