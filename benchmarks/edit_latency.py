"""Edit latency: one prototype edit (DDIM inversion + decode) per image, against the paper code's 2000 UNet calls.

    python benchmarks/edit_latency.py --checkpoint runs/mnist_cpu      # ~4 min on 2 CPU cores

1. Quality: reconstruction PSNR of a trained run (default: the default run) for DDIM inversion
   + decoding with N steps each (plain: N ∈ {1000, 100, 50, 25}), and with fixed-point
   inversion (k extra calls per inversion step). The chosen setting is the one with the fewest
   UNet calls whose mean PSNR is within 0.5 dB of plain N = 1000; if none is, the one with the
   highest PSNR is reported as the best measured point. Plain 50 + 50 (the default) is timed too.
2. Speed, on the paper-sized model (UNet 64·(1,2,4,4), 2 blocks/level, attention at 8×8; weights
   do not change the cost): the paper code edits one image at a time with 1000 inversion + 1000
   decoding UNet calls; the pipeline inverts and decodes a batch. Reported per image, fp32: the
   pure call-count ratio and the measured wall-clock ratio with batching.
Writes benchmarks/edit_latency.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from patronus.cli.common import DataSource, first_images, run_dataset
from patronus.edits import Edit, apply_edits
from patronus.interpret.generation_metrics import psnr
from patronus.models.patronus import PatronusModel
from patronus.pipeline import PatronusPipeline

PAPER = dict(image_size=32, in_channels=1, num_prototypes=30)  # PatronusModel's defaults are the paper's UNet
# (inversion steps N, fixed-point iterations k): N·(k + 1) inversion calls + N decoding calls
SETTINGS = ((1000, 0), (100, 0), (50, 0), (25, 0), (10, 3), (20, 3), (25, 4), (50, 4), (50, 8), (100, 6))


def calls(n: int, k: int) -> int:
    return n * (k + 1) + n


def psnr_by_setting(checkpoint: str, images: int) -> dict[str, dict]:
    pipe = PatronusPipeline.from_pretrained(checkpoint)
    x0 = first_images(run_dataset(checkpoint, pipe, DataSource()), images)
    out = {}
    for n, k in SETTINGS:
        t0 = time.perf_counter()
        _, recon = pipe.reconstruct(x0, n, fixed_point=k)
        out[f"{n}x{k}"] = {"steps": n, "fixed_point": k, "calls": calls(n, k), "psnr_db": sum(psnr(recon, x0)) / len(x0)}
        print(
            f"  N={n:>4} k={k}: {calls(n, k):>5} calls, {out[f'{n}x{k}']['psnr_db']:.2f} dB ({time.perf_counter() - t0:.0f} s)", flush=True
        )
    return out


def seconds_per_unet_call(net: PatronusModel, batch: int, calls: int) -> float:
    x = torch.randn(batch, 1, 32, 32)
    s = torch.rand(batch, net.config.num_prototypes)
    t = torch.full((batch,), 500)
    with torch.no_grad():
        net(x, t, s=s)  # warm-up
        t0 = time.perf_counter()
        for _ in range(calls):
            net(x, t, s=s)
    return (time.perf_counter() - t0) / calls


def seconds_per_edit(pipe: PatronusPipeline, batch: int, steps: int, fixed_point: int) -> float:
    """Wall time per image of encode + DDIM inversion + decoding under an edited s, `batch` images at once
    (images of the model's shape; on a GPU the clock stops when its work is done)."""
    x0 = torch.rand(batch, *pipe.image_shape()) * 2 - 1

    def edit() -> torch.Tensor:
        s = pipe.encode(x0).s
        x_T = pipe.invert(x0, s, steps, fixed_point=fixed_point)
        return pipe.denoise(x_T, apply_edits(s, [Edit(0, "set", 0.2)]), steps, clip=False)

    pipe.invert(x0[:1], None, 2)  # warm-up
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    edit()
    sync()
    return (time.perf_counter() - t0) / batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/mnist_cpu")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch", type=int, default=16, help="images edited together by the pipeline")
    p.add_argument("--out", default=str(Path(__file__).with_name("edit_latency.json")))
    a = p.parse_args()
    print(f"reconstruction PSNR of {a.checkpoint} on {a.images} validation images:")
    quality = psnr_by_setting(a.checkpoint, a.images)
    reference = quality["1000x0"]["psnr_db"]
    equal = [q for q in quality.values() if q["psnr_db"] >= reference - 0.5 and q["steps"] < 1000]
    cheap = [q for q in quality.values() if q["steps"] < 1000]
    chosen = min(equal, key=lambda q: q["calls"]) if equal else max(cheap, key=lambda q: q["psnr_db"])
    torch.manual_seed(0)
    net = PatronusModel(**PAPER).eval()
    pipe = PatronusPipeline(model=net)
    per_call_b1 = seconds_per_unet_call(net, 1, 10)
    paper_edit = 2000 * per_call_b1  # one image at a time, 1000 + 1000 calls
    n, k = chosen["steps"], chosen["fixed_point"]
    ours_b1 = seconds_per_edit(pipe, 1, n, k)
    ours_batched = seconds_per_edit(pipe, a.batch, n, k)
    default_batched = seconds_per_edit(pipe, a.batch, 50, 0)
    res = {
        "checkpoint": a.checkpoint,
        "psnr_db": quality,
        "reference_psnr_db_1000_steps": reference,
        "chosen": chosen,
        "chosen_reaches_reference_within_0.5_db": bool(equal),
        "paper_model_params_m": sum(p.numel() for p in net.parameters()) / 1e6,
        "threads": torch.get_num_threads(),
        "paper_edit_s_per_image": paper_edit,
        "unet_call_s_batch1": per_call_b1,
        "ours_s_per_image_batch1": ours_b1,
        f"ours_s_per_image_batch{a.batch}": ours_batched,
        "speedup_call_count": 2000 / chosen["calls"],
        "speedup_batch1": paper_edit / ours_b1,
        f"speedup_batch{a.batch}": paper_edit / ours_batched,
        f"plain_50_s_per_image_batch{a.batch}": default_batched,
        f"plain_50_speedup_batch{a.batch}": paper_edit / default_batched,
    }
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
