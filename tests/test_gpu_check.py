"""benchmarks/gpu_check.sh --cpu-smoke: the GPU check's table at toy size on CPU, so it never rots."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from patronus.runs import load_model
from tests.conftest import REPO

REQUIRED = {  # the rows: training eager and compiled, the loader, edit latency, faithfulness
    ("train eager", "img/s"),
    ("train eager", "MFU"),
    ("train eager", "peak memory"),
    ("train eager", "loader wait share"),
    ("train compiled", "img/s"),
    ("train compiled", "MFU"),
    ("train compiled", "peak memory"),
    ("train compiled", "loader wait share"),
    ("edit latency", "batch 1"),
    ("faithfulness", "class agreement"),
}


@pytest.mark.slow  # ~2 min on 2 busy cores: two short training runs, edits and a faithfulness run
def test_cpu_smoke_prints_every_row_with_a_finite_number(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "2", "WANDB_MODE": "offline"}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--out", str(out), "--work-dir", str(tmp_path / "work")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    printed = {
        (m[1], m[2]): float(m[3])
        for m in re.finditer(r"^\| ([^|]+?) \| ([^|]+?) \| ([^|]+?) \| [^|]+ \|$", done.stdout, re.MULTILINE)
        if m[1] != "check"
    }
    res = json.loads(out.read_text())
    rows = {(r["check"], r["metric"]): r["value"] for r in res["rows"]}
    assert REQUIRED <= set(rows) and set(printed) == set(rows)
    bad = {k: v for k, v in rows.items() if not (isinstance(v, (int, float)) and math.isfinite(v))}
    assert not bad and all(math.isfinite(v) for v in printed.values()), (bad, printed)
    assert rows[("train eager", "img/s")] > 0 and 0 <= rows[("train eager", "loader wait share")] < 100
    assert res["details"]["train compiled"]["timed steps"] == res["steps"] - res["warmup"]
    load_model(tmp_path / "work" / "train_compiled")  # the compiled run exports the eager model's keys
