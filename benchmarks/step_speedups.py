"""Learning per CPU minute, the framework levers: one training step of the default run's model under each.

    python benchmarks/step_speedups.py            # 4 min alone on 2 cores; benchmarks/step_speedups.json

Times forward + backward + AdamW of `configs/mnist_cpu.yaml`'s model (bf16 autocast, the v loss
with Min-SNR-5, random images: the step's cost does not depend on them) at its batch of 64, eager,
and with each lever (eager also: where its time goes, by operator, and the prototype encoder's
share): channels-last memory format, fused AdamW, `torch.compile` of the UNet (its
compile time reported apart, from an empty compile cache as on a fresh machine), and batch 32.
Each variant runs in a fresh process, one after another, so run it alone on the machine. What a
lever buys in class agreement at equal minutes is measured by `faithfulness_scaling.py` (docs:
benchmarks, "Learning per CPU minute").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "eager": {},
    "channels_last": {"channels_last": True},
    "fused_adamw": {"fused": True},
    "compile": {"compile": True},
    "batch_32": {"batch": 32},
}


def step_time(
    config: str, batch: int = 64, channels_last: bool = False, fused: bool = False, compile: bool = False, reps: int = 30
) -> dict[str, float]:
    """Seconds per training step after 5 warm-up steps (the warm-up's seconds include compiling)."""
    from patronus.diffusion import diffusion_loss
    from patronus.models.patronus import PatronusModel

    torch.manual_seed(0)
    net_args = yaml.safe_load(Path(config).read_text())["model"]["net"]
    net = PatronusModel(**net_args)
    scheduler = net.noise_scheduler()
    x = torch.rand(batch, net.config.in_channels, net.config.image_size, net.config.image_size) * 2 - 1
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if compile:
        net.denoiser.unet.compile()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=fused)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = diffusion_loss(net, scheduler, x, 5.0)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    for _ in range(5):
        step()
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    per_step = (time.perf_counter() - t0) / reps
    out = {"batch": batch, "seconds_per_step": per_step, "img_per_s": batch / per_step, "warmup_seconds": warmup}
    if not (channels_last or fused or compile) and batch == 64:
        out["time_shares"] = where_time_goes(step)
        t0 = time.perf_counter()
        for _ in range(reps):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                s = net.encode(x)
            s.sum().backward()
        out["encoder_seconds_per_step"] = (time.perf_counter() - t0) / reps
    return out


def where_time_goes(step, reps: int = 5) -> dict[str, float]:
    """Share of the step's CPU time per kind of operator (torch.profiler, self time)."""
    from torch.profiler import ProfilerActivity, profile

    groups = {
        "convolution backward": ("convolution_backward",),
        "convolution forward": ("convolution",),
        "dtype casts (copy_)": ("copy_", "_to_copy"),
        "group norm, SiLU (fwd + bwd)": ("group_norm", "silu"),
        "optimizer (AdamW)": ("_foreach", "adam"),
    }
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares = dict.fromkeys([*groups, "other"], 0.0)
    for e in events:
        name = next((g for g, keys in groups.items() if any(k in e.key for k in keys)), "other")
        shares[name] += e.self_cpu_time_total / total
    return shares


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/mnist_cpu.yaml")
    p.add_argument("--variant", choices=list(VARIANTS), help="time one variant in this process (internal)")
    p.add_argument("--out", default=str(HERE / "step_speedups.json"))
    a = p.parse_args(argv)
    if a.variant:
        print(json.dumps(step_time(a.config, **VARIANTS[a.variant])))
        return {}
    rows: dict[str, Any] = {}
    for name in VARIANTS:
        with tempfile.TemporaryDirectory() as cache:  # compile cold, as a fresh machine would
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            cmd = [sys.executable, __file__, "--config", a.config, "--variant", name]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
        rows[name]["speedup"] = rows["eager"]["seconds_per_step"] / rows[name]["seconds_per_step"] * rows[name]["batch"] / 64
        if "time_shares" in rows[name]:
            print("  " + ", ".join(f"{k} {v:.0%}" for k, v in rows[name]["time_shares"].items()))
        print(
            f"{name:14s} {rows[name]['img_per_s']:6.1f} img/s  ×{rows[name]['speedup']:.2f}  warm-up {rows[name]['warmup_seconds']:.0f} s",
            flush=True,
        )
    result = {
        "config": a.config,
        "torch": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "variants": rows,
    }
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main()
