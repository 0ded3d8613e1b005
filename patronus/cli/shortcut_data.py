"""`python -m patronus.cli.shortcut_data KIND --data.dataset NAME --data.root PATH [--params '{...}']`:
build a shortcut dataset (patronus.data.shortcuts) and print the correlations it produced."""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

from jsonargparse import ArgumentParser

from patronus.cli.common import DataSource, report_user_errors, wants_debug
from patronus.data.registry import build_dataset
from patronus.data.shortcuts import BUILDERS, apply_shortcut


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m patronus.cli.shortcut_data", description="Build a shortcut dataset and report its correlations.")
    p.add_argument("kind", type=str, help=f"one of {sorted(BUILDERS)}")
    p.add_class_arguments(DataSource, "data")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--params", type=dict, default={}, help='builder parameters, e.g. \'{"target": "1", "p": 0.9}\'')
    p.add_argument("--debug", type=bool, default=False, help="show the traceback of an error")
    return p


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    debug = wants_debug(argv)
    a = build_parser().parse_args(argv)

    def run() -> dict[str, Any]:
        d = a.data
        if not (d.dataset and d.root):
            raise ValueError("data: pass --data.dataset and --data.root")
        ds = build_dataset(d.dataset, d.root, d.split or "train", a.image_size, **(d.options or {}))
        _, report = apply_shortcut(ds, a.image_size, {"kind": a.kind, **dict(a.params)})
        print(json.dumps(report, indent=2))
        return report

    return report_user_errors(run, debug)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
