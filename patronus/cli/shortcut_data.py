"""`python -m patronus.cli.shortcut_data KIND --data.dataset NAME --data.root PATH [--params '{...}'] [--out_dir DIR]`:
build a shortcut dataset (patronus.data.shortcuts) and print the correlations it produced; with
`--out_dir`, also write every split of `--splits` in the `attribute_folder` layout
(patronus.data.export), images + masks + attributes.csv, so it trains like any user folder."""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

from jsonargparse import ArgumentParser

from patronus.cli.common import DataSource, report_user_errors, wants_debug
from patronus.data.export import CSV_NAME, MASKS, write_attribute_folder
from patronus.data.registry import build_dataset
from patronus.data.shortcuts import BUILDERS, apply_shortcut


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m patronus.cli.shortcut_data", description="Build a shortcut dataset and report its correlations.")
    p.add_argument("kind", type=str, help=f"one of {sorted(BUILDERS)}")
    p.add_class_arguments(DataSource, "data")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--params", type=dict, default={}, help='builder parameters, e.g. \'{"target": "1", "p": 0.9}\'')
    p.add_argument("--out_dir", type=Optional[str], default=None, help="write the built splits here (attribute_folder layout)")
    p.add_argument("--splits", type=list[str], default=["train", "test"], help="splits written with --out_dir")
    p.add_argument(
        "--balanced_splits",
        type=list[str],
        default=[],
        help="with --out_dir and a planted_marker: also write these splits as SPLIT_balanced, the marker planted "
        "independently of the target (p = q = 0.5): a group-balanced held-out set for worst-group accuracy",
    )
    p.add_argument("--overwrite", type=bool, default=False, help="let --out_dir be a non-empty folder")
    p.add_argument("--debug", type=bool, default=False, help="show the traceback of an error")
    return p


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    debug = wants_debug(argv)
    a = build_parser().parse_args(argv)

    def run() -> dict[str, Any]:
        d = a.data
        if not (d.dataset and d.root):
            raise ValueError("data: pass --data.dataset and --data.root")
        spec = {"kind": a.kind, **dict(a.params)}
        build = lambda split, change={}: apply_shortcut(  # noqa: E731
            build_dataset(d.dataset, d.root, split, a.image_size, **(d.options or {})), a.image_size, spec | change
        )
        if a.out_dir is None:
            _, report = build(d.split or "train")
        else:
            if not a.splits:
                raise ValueError("splits: expected at least one split to write")
            if a.balanced_splits and a.kind != "planted_marker":
                raise ValueError(f"balanced_splits: only a planted_marker can be re-planted balanced, not {a.kind!r}")
            built = {split: build(split) for split in a.splits}
            built |= {f"{split}_balanced": build(split, {"p": 0.5, "q": 0.5}) for split in a.balanced_splits}
            counts = write_attribute_folder({s: b[0] for s, b in built.items()}, a.out_dir, a.overwrite)
            report = {
                "splits": {s: b[1] for s, b in built.items()},
                "written": counts,
                "out_dir": str(a.out_dir),
                "read_with": {
                    "dataset": "attribute_folder",
                    "root": str(a.out_dir),
                    "options": {"attributes_csv": CSV_NAME, "masks": MASKS},
                },
            }
        print(json.dumps(report, indent=2))
        return report

    return report_user_errors(run, debug)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
