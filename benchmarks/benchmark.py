"""Throughput benchmark, all numbers from one run on one machine (ratios, not asserts).

    python benchmarks/benchmark.py                       # CPU, fp32 and bf16 autocast
    python benchmarks/benchmark.py --device cuda --precision bf16 --batch 128

Measures: matmul peak (fp32 and bf16) on this device, GFLOP per training image
(torch FlopCounterMode, forward+backward), train img/s and MFU for the paper-sized and the
CPU-preset UNets, our Lightning training loop vs a plain PyTorch loop on the same model, and
DDIM-50 vs 1000-step DDPM sampling time per image. Writes JSON (and prints a Markdown table).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from patronus.diffusion import diffusion_loss
from patronus.models.patronus import PatronusModel
from patronus.pipeline import PatronusPipeline
from patronus.training.module import PatronusModule

PAPER = dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, attention_levels=(False, False, True, False))
CPU = dict(block_out_channels=(32, 64, 64), layers_per_block=1, attention_levels=(False, False, False), mid_attention=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Seconds per call, best of the mean over `reps` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / reps


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...]) -> float:
    """Best GFLOP/s of square matmuls over several sizes and trials (a noisy machine only lowers it)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            best = max(best, 2 * n**3 / timeit(lambda: torch.mm(a, b), device, warmup=2, reps=8) / 1e9)
    return best


def conv_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Best GFLOP/s (counted as 2·MACs) of a UNet-like 3x3 conv, 128->128 channels at 32x32.

    On CPUs oneDNN's convolution kernels can beat the BLAS matmul, so a UNet's counted
    FLOP/s may exceed the matmul "peak"; this is the peak of the op the model is made of.
    """
    x = torch.randn(32, 128, 32, 32, device=device, dtype=dtype)
    w = torch.randn(128, 128, 3, 3, device=device, dtype=dtype)
    flops = 2 * 32 * 32 * 32 * 128 * 128 * 9
    return max(flops / timeit(lambda: torch.nn.functional.conv2d(x, w, padding=1), device, 2, 5) / 1e9 for _ in range(3))


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step_fn(net: PatronusModel, x: torch.Tensor, precision: str):
    sched = net.noise_scheduler()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step():
        with autocast(x.device, precision):
            loss, _ = diffusion_loss(net, sched, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sched


def flops_per_image(net: PatronusModel, x: torch.Tensor) -> float:
    sched = net.noise_scheduler()
    with FlopCounterMode(display=False) as counter:
        loss, _ = diffusion_loss(net, sched, x)
        loss.backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.shape[0] / 1e9


class RandomImages(Dataset):
    def __init__(self, n: int, shape: tuple[int, ...]):
        self.x = torch.rand(n, *shape) * 2 - 1

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": torch.tensor(0), "attributes": torch.zeros(1)}


def lightning_img_per_s(cfg: dict, batch: int, steps: int, device: torch.device, precision: str) -> float:
    """The full training loop as users run it (Trainer, module, logging hooks), timed after warmup."""

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, *_):
            if trainer.global_step == 3:
                sync(device)
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, *_):
            sync(device)
            self.sec = time.perf_counter() - self.t0

    timer = Timer()
    module = PatronusModule(PatronusModel(**cfg), lr=1e-4)
    loader = DataLoader(RandomImages(batch * (steps + 3), (1, 32, 32)), batch_size=batch, shuffle=True, drop_last=True)
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        precision="bf16-mixed" if precision == "bf16" else "32-true",
        max_steps=steps + 3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    return steps * batch / timer.sec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=5, help="timed train steps per measurement")
    p.add_argument("--matmul-sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--sample-batch", type=int, default=8)
    p.add_argument("--out", default="benchmarks/results.json")
    a = p.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    res: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "batch": a.batch,
    }
    sizes = tuple(a.matmul_sizes)
    res["matmul_peak_gflops"] = {"fp32": matmul_peak(device, torch.float32, sizes), "bf16": matmul_peak(device, torch.bfloat16, sizes)}
    res["conv3x3_peak_gflops"] = {"fp32": conv_peak(device, torch.float32), "bf16": conv_peak(device, torch.bfloat16)}
    x = torch.rand(a.batch, 1, 32, 32, device=device) * 2 - 1
    res["models"] = {}
    for name, cfg in (("paper_unet_64x(1,2,4,4)", PAPER), ("cpu_preset_unet_32x(1,2,2)", CPU)):
        net = PatronusModel(**cfg).to(device)
        entry = {"params_M": sum(q.numel() for q in net.parameters()) / 1e6, "gflop_per_img": flops_per_image(net, x)}
        for prec in a.precision:
            step, _ = train_step_fn(net, x, prec)
            sec = timeit(step, device, warmup=2, reps=a.reps)
            ips = a.batch / sec
            entry[prec] = {
                "img_per_s": ips,
                "achieved_gflops": ips * entry["gflop_per_img"],
                "mfu_vs_fp32_matmul_peak": ips * entry["gflop_per_img"] / res["matmul_peak_gflops"]["fp32"],
                "mfu_vs_same_dtype_matmul_peak": ips * entry["gflop_per_img"] / res["matmul_peak_gflops"][prec],
                "mfu_vs_same_dtype_conv_peak": ips * entry["gflop_per_img"] / res["conv3x3_peak_gflops"][prec],
            }
        res["models"][name] = entry
        print(json.dumps({name: entry}, indent=1), flush=True)

    # Our Lightning loop vs the plain loop above, same (CPU-preset) model and precision.
    prec = a.precision[-1]
    plain = res["models"]["cpu_preset_unet_32x(1,2,2)"][prec]["img_per_s"]
    ours = lightning_img_per_s(CPU, a.batch, max(a.reps * 4, 20), device, prec)
    res["lightning_vs_plain"] = {"precision": prec, "plain_img_per_s": plain, "lightning_img_per_s": ours, "ratio": ours / plain}

    # Sampling through the pipeline (fp32, as every analysis): DDIM-50 vs 1000-step DDPM, CPU-preset model, s per image.
    pipe = PatronusPipeline(model=PatronusModel(**CPU)).to(device)
    xs = torch.randn(a.sample_batch, 1, 32, 32, device=device)
    s = pipe.encode(xs).s
    t50 = timeit(lambda: pipe.sample(s, xs, steps=50), device, warmup=1, reps=1)
    t1000 = timeit(lambda: pipe.sample(s, xs, steps=1000, sampler="ddpm"), device, warmup=0, reps=1)
    res["sampling_s_per_img"] = {
        "precision": "fp32",
        "ddim_50": t50 / a.sample_batch,
        "ddpm_1000": t1000 / a.sample_batch,
        "speedup": t1000 / t50,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "models"}, indent=1))
    print(
        "\n| model | precision | GFLOP/img | img/s | achieved GFLOP/s | MFU vs matmul peak | MFU vs 3x3-conv peak |"
        "\n|---|---|---|---|---|---|---|"
    )
    for name, e in res["models"].items():
        for prec in a.precision:
            q = e[prec]
            print(
                f"| {name} | {prec} | {e['gflop_per_img']:.2f} | {q['img_per_s']:.1f} | {q['achieved_gflops']:.0f} | "
                f"{q['mfu_vs_same_dtype_matmul_peak']:.0%} | {q['mfu_vs_same_dtype_conv_peak']:.0%} |"
            )


if __name__ == "__main__":
    main()
