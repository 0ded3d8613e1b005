"""Faithfulness to s across runs and edit guidance scales: `python -m patronus faithfulness` on a grid.

    python benchmarks/faithfulness.py --runs runs/mnist_cpu runs/mnist_marker_cpu --edit_guidance 1 2 4
    python benchmarks/faithfulness.py --runs runs/mnist_cpu runs/fashion_mnist_cpu --edit_images 64 \
        --case cpu_presets        # 6 min alone

For every run directory and every edit guidance, runs the faithfulness command (its figures and
JSON go to RUN/analysis/faithfulness/e<edit_guidance>/), prints one markdown table and stores it
under `--case` in benchmarks/faithfulness.json (one file for every case). The judge is retrained for
every setting from the same seed, so every row of a run is judged by the same classifier.
Definitions: patronus/interpret/{judge,agreement,edit_gain,marker_rule,marker_effect}.py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional, get_args

from patronus import runs
from patronus.cli.analyses import main as patronus_main
from patronus.pipeline import Inversion

COLUMNS = [
    ("run", "run"),
    ("edit g", "edit_guidance"),
    ("inversion", "inversion"),
    ("coupling", "coupling"),
    ("judge acc", "judge_acc"),
    ("class agr.", "class_agreement"),
    ("label agr.", "label_agreement"),
    ("attr agr.", "attribute_agreement"),
    ("s→class probe", "s_class_probe"),
    ("pixel probe", "pixel_class_probe"),
    ("s cycle", "s_cycle"),
    ("judge FID", "judge_fid"),
    ("real FID", "judge_fid_real"),
    ("raise gain", "raise_gain"),
    ("lower gain", "lower_gain"),
    ("raise |Δx|", "raise_pixels"),
    ("lower |Δx|", "lower_pixels"),
    ("marker drawn", "drawn"),
    ("marker removed", "removed"),
    ("removed under an unmarked s", "removed_by_swap"),
    ("drawn from noise", "drawn_from_noise"),
    ("unedited", "drawn_from_noise_unedited"),
    ("removed from noise", "removed_from_noise"),
    ("unedited", "removed_from_noise_unedited"),
    ("s", "seconds"),
]


def row_of(run: str, edit_guidance: float, out: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The table's numbers from one faithfulness result."""
    marker = out.get("marker") or {}
    refs = marker.get("references") or {}
    quality = out.get("sample_quality") or {}
    return {
        "run": run,
        "edit_guidance": edit_guidance,
        "inversion": out.get("inversion", "ddim"),
        "coupling": out.get("coupling", "alone"),
        "judge_acc": out["judge"]["class_accuracy"],
        "class_agreement": out["agreement"]["class_agreement"],
        "label_agreement": out["agreement"]["label_agreement"],
        "attribute_agreement": out["agreement"]["attribute_agreement_mean"],
        "s_class_probe": out["agreement"].get("s_class_probe"),
        "pixel_class_probe": out["agreement"].get("pixel_class_probe"),
        "s_cycle": out["s_cycle"]["mean"],
        "judge_fid": quality.get("judge_fid"),
        "judge_fid_real": quality.get("judge_fid_real"),
        "raise_gain": out["edits"]["raise"]["gain_mean"],
        "lower_gain": out["edits"]["lower"]["gain_mean"],
        "raise_pixels": out["edits"]["raise"]["pixel_change_mean"],
        "lower_pixels": out["edits"]["lower"]["pixel_change_mean"],
        "drawn": marker.get("drawn_rate"),
        "removed": marker.get("removed_rate"),
        **{
            k: refs.get(k)
            for k in (
                "removed_by_swap",
                "drawn_from_noise",
                "drawn_from_noise_unedited",
                "removed_from_noise",
                "removed_from_noise_unedited",
            )
        },
        "seconds": seconds,
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[k]) for _, k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=["runs/mnist_cpu"], help="run directories (or exported models)")
    p.add_argument("--edit_guidance", type=float, nargs="+", default=[1.0], help="edit guidance scales of the edits")
    p.add_argument("--num_images", type=int, default=256)
    p.add_argument("--samples_per_ref", type=int, default=1)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--num_edit_prototypes", type=int, default=4)
    p.add_argument("--edit_images", type=int, default=None, help="edit gain on the first N references only (default: all)")
    p.add_argument("--inverted_steps", type=int, default=None)
    p.add_argument("--inversion", default=None, choices=get_args(Inversion), help="how the edits invert (default: the command's)")
    p.add_argument("--judge_epochs", type=int, default=2)
    p.add_argument("--judge_images", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--case", default="default", help="the name this grid's results are stored under in --out")
    p.add_argument("--out", default=str(Path(__file__).with_name("faithfulness.json")), help="one JSON for every case")
    a = p.parse_args(argv)
    options = [
        "--num_images",
        str(a.num_images),
        "--samples_per_ref",
        str(a.samples_per_ref),
        "--steps",
        str(a.steps),
        "--num_edit_prototypes",
        str(a.num_edit_prototypes),
        "--judge_epochs",
        str(a.judge_epochs),
        "--judge_images",
        str(a.judge_images),
        "--seed",
        str(a.seed),
    ]
    options += ["--inverted_steps", str(a.inverted_steps)] if a.inverted_steps is not None else []
    options += ["--edit_images", str(a.edit_images)] if a.edit_images is not None else []
    options += ["--device", a.device] if a.device else []
    options += ["--inversion", a.inversion] if a.inversion else []
    rows, results = [], []
    for run in a.runs:
        for e in a.edit_guidance:
            out_dir = runs.analysis_dir(run) / "faithfulness" / (f"e{e:g}" + (f"_{a.inversion}" if a.inversion else ""))
            t0 = time.perf_counter()
            out = patronus_main(["faithfulness", "--checkpoint", run, "--edit_guidance", str(e), "--out", str(out_dir), *options])
            seconds = time.perf_counter() - t0
            rows.append(row_of(run, e, out, seconds))
            results.append({"run": run, "edit_guidance": e, "seconds": seconds, "out": str(out_dir), "result": out})
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    table = markdown(rows)
    print(table)
    report = {"settings": vars(a), "table": rows, "markdown": table, "results": results}
    out = Path(a.out)
    cases = json.loads(out.read_text()) if out.is_file() else {}
    cases[a.case] = report  # re-running a case replaces it; the other cases are kept
    out.write_text(json.dumps(cases, indent=1))
    print(f"wrote {a.case} in {a.out}")
    return report


if __name__ == "__main__":
    main()
