"""When does the generator read s? Swap the condition at step k of the DDIM decode and ask the judge.

    python benchmarks/condition_timing.py --runs runs/mnist_cpu runs/scaling/v900

For each run: pairs (A, B) of held-out references that the judge puts in different classes; from
the same fresh x_T, decode steps 0..k-1 (t from 999 down) under s_A and steps k..49 under s_B,
then report how often the judge sees A's class and how often B's, for k over the schedule. Where
the curve for A climbs is where the class is decided: a generator that ignores s at high noise
leaves the digit to whatever s it is given late. Judge: the one `python -m patronus faithfulness`
trains (same seed, same data). Writes benchmarks/condition_timing.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

import torch

from patronus.cli.common import Context, DataSource, load_pipeline
from patronus.cli.faithfulness import judged_data
from patronus.sampling import denoise_loop
from patronus.schedulers import scheduler_for

SWITCH_STEPS = [0, 3, 6, 10, 15, 20, 25, 30, 40, 50]


def condition_timing(run: str, num_images: int, steps: int) -> dict[str, Any]:
    pipe = load_pipeline(run, "cpu")
    ctx = Context(pipe, run, Path(run), 0, DataSource())
    data = judged_data(ctx, num_images, 10000, 2)
    judge, held = data.judge, data.held
    refs = held[:num_images]
    cls = judge.predict(refs).classes
    partner = torch.roll(torch.arange(len(refs)), 1)
    pair = cls != cls[partner]  # only pairs the judge tells apart
    a, b, ya, yb = refs[pair], refs[partner][pair], cls[pair], cls[partner][pair]
    s_a, s_b = pipe.encode(a).s, pipe.encode(b).s
    x_T = pipe.noise(a.shape, seed=0)
    sched = scheduler_for(pipe.scheduler.config, "ddim", steps)
    timesteps = sched.timesteps.tolist() + [0]
    rows = []
    for k in [k for k in SWITCH_STEPS if k <= steps]:
        under_a = set(timesteps[:k])  # decoding steps 0..k-1 see s_A, the rest s_B

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return pipe.model(x, t.expand(len(x)), s=s_a if int(t) in under_a else s_b)

        with pipe.inference():
            x = denoise_loop(sched, x_T, eps)
        got = judge.predict(x).classes
        rows.append(
            {
                "switch_step": k,
                "switch_t": timesteps[k],
                "class_of_A": float((got == ya).float().mean()),
                "class_of_B": float((got == yb).float().mean()),
            }
        )
        print(run, rows[-1], flush=True)
    return {"run": run, "pairs": int(pair.sum()), "steps": steps, "rows": rows}


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=["runs/mnist_cpu"])
    p.add_argument("--num_images", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", default=str(Path(__file__).with_name("condition_timing.json")))
    a = p.parse_args(argv)
    results = [condition_timing(r, a.num_images, a.steps) for r in a.runs]
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {a.out}")
    return results


if __name__ == "__main__":
    main()
