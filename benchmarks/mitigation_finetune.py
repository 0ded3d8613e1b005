"""Does fine-tuning with a shortcut finding held stop the generator from drawing the marker?

    python -m patronus shortcuts --checkpoint RUN --data.split test     # writes finetune_held.yaml
    python benchmarks/mitigation_finetune.py --run RUN [--steps 300] [--num_images 64]

RUN is a planted-marker run (data.shortcut.kind = planted_marker, masks kept). The shortcut
report wrote RUN/analysis/shortcuts/finetune_held.yaml: the top finding's prototypes held at
their neutral value (the median over images without the marker). This fine-tunes RUN with it
for `--steps` steps into RUN_held (resumed if there), then samples, from fresh noise, the s of
held-out target-class images that carry the marker, three ways:

  before        the original model, s as encoded
  neutralised   the original model, the finding's prototypes set to their neutral value
                (what the report's mitigation grid shows: no retraining)
  fine-tuned    the fine-tuned model, the same neutralised s (what it was trained with)

and reports the share of samples in which the marker is drawn, judged by the pixel rule
calibrated on real marked / unmarked images and their masks (`marker_detector`), beside the
share among the real images themselves. Writes RUN_held/mitigation.json and mitigation.png
(rows: real images, before, neutralised, fine-tuned).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from patronus import plots, runs
from patronus.cli.common import DataSource, load_pipeline, run_dataset
from patronus.cli.train import train_main
from patronus.edits import hold_prototypes
from patronus.interpret.marker_rule import marker_detector

FINETUNE_CONFIG = Path(runs.ANALYSIS_DIR) / "shortcuts" / "finetune_held.yaml"


def held_prototypes(run: Path) -> dict[int, float]:
    """{prototype: neutral value} from the report's fine-tuning config."""
    path = run / FINETUNE_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no fine-tuning config; run `python -m patronus shortcuts --checkpoint {run}` first")
    held = (yaml.safe_load(path.read_text()).get("model") or {}).get("held_prototypes")
    if not held:
        raise ValueError(f"{path}: model.held_prototypes is empty (the report flagged nothing to hold)")
    return {int(j): float(v) for j, v in held.items()}


def finetune(run: Path, out: Path, steps: int) -> float:
    """Fine-tune RUN with the report's config into OUT (resumed if started); seconds taken."""
    start = time.time()
    train_main(
        [
            "--config",
            str(run / runs.CONFIG_FILE),
            "--config",
            str(run / FINETUNE_CONFIG),
            "--run_dir",
            str(out),
            "--trainer.max_steps",
            str(steps),
            "--logger",
            "none",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    return time.time() - start


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a planted-marker run with its shortcut report")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    p.add_argument("--num_images", type=int, default=64, help="marked target-class images whose s is sampled")
    p.add_argument("--sampling_steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    held = held_prototypes(a.run)
    out = a.run.with_name(f"{a.run.name}_held")
    seconds = finetune(a.run, out, a.steps)

    before = load_pipeline(str(a.run), None)
    after = load_pipeline(str(out), None)
    ds = run_dataset(str(a.run), before, DataSource(split="test"))
    target = str((runs.run_config(str(a.run)).get("data") or {}).get("shortcut", {}).get("target"))
    names = ds.attribute_names
    if "marker" not in names:
        raise ValueError(f"{a.run}: its data has no 'marker' attribute (not a planted-marker run)")
    marker = ds.attributes[:, names.index("marker")]
    is_target = ds.labels == (ds.classes.index(target) if target in ds.classes else int(target))
    marked_rows = ((marker == 1) & is_target).nonzero().flatten()[: a.num_images].tolist()
    unmarked_rows = (marker == 0).nonzero().flatten()[: a.num_images].tolist()
    if not marked_rows or not unmarked_rows:
        raise ValueError(f"{a.run}: {len(marked_rows)} marked target images and {len(unmarked_rows)} unmarked images; need both")
    items = [ds[i] for i in marked_rows]
    marked, masks = torch.stack([it["image"] for it in items]), torch.stack([it["marker_mask"] for it in items])
    unmarked = torch.stack([ds[i]["image"] for i in unmarked_rows])
    detector = marker_detector(unmarked, marked, masks)

    s = before.encode(marked).s.cpu()
    s_neutral = hold_prototypes(s, held)
    samples = {}
    for name, pipe, cond in (("before", before, s), ("neutralised", before, s_neutral), ("fine_tuned", after, s_neutral)):
        gen = torch.Generator().manual_seed(a.seed)  # the same noise for all three
        samples[name] = pipe.sample(cond, generator=gen, steps=a.sampling_steps).cpu()
    rates = {name: float(detector.present(x).float().mean()) for name, x in samples.items()}
    result = {
        "run": str(a.run),
        "fine_tuned_run": str(out),
        "held_prototypes": held,
        "fine_tune_steps": a.steps,
        "fine_tune_seconds": round(seconds, 1),
        "images": len(marked),
        "target": target,
        "marker_in_real_images": float(detector.present(marked).float().mean()),
        "marker_drawn": rates,
        "detector_real_accuracy": detector.real_accuracy,
    }
    c = min(len(marked), 16)
    plots.save_rows([marked[:c], *(x[:c] for x in samples.values())], out / "mitigation.png")
    (out / "mitigation.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
