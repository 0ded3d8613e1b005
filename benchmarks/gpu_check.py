"""One GPU check: the paper preset's training speed (eager and torch.compile), whether the loader
keeps up, edit latency and a short faithfulness run, as one table.

    bash benchmarks/gpu_check.sh                 # on one GPU (<= 8 min on an H100); writes benchmarks/gpu_check.json
    python benchmarks/gpu_check.py --cpu-smoke   # toy sizes on CPU (tests/test_gpu_check.py): the table never rots

Training: configs/mnist_paper.yaml (the paper's UNet, whose FLOPs benchmarks/results.json counts) on
the embedded MNIST subset with the preset's loader settings, bf16-mixed, through the same CLI as
train.py, `--steps` steps of which the first `--warmup` are not timed, once eager and once with
`--model.compile true`. Each step ends with a device synchronise, so the time from one step's end
to the next step's start (batch fetch and copy, and Lightning's hooks between steps) is time the
GPU sits idle: loader wait share = that time / all timed time. MFU = img/s x training GFLOP per image (forward +
backward, FlopCounterMode) / the card's dense bf16 peak (datasheet by name, else --peak-tflops,
else a measured bf16 matmul peak). Edit latency: encode + 50-step DDIM inversion + 50-step decode
of an edit per image (benchmarks/edit_latency.py) on the eager run's model; faithfulness: a short
`python -m patronus faithfulness` on it (a few hundred steps of training: a timing and plumbing
check, not a quality number).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edit_latency import seconds_per_edit  # noqa: E402
from loader_throughput import gflop_per_image  # noqa: E402

from patronus.cli.analyses import main as analyses_main  # noqa: E402
from patronus.cli.train import PatronusCLI  # noqa: E402
from patronus.pipeline import PatronusPipeline  # noqa: E402
from patronus.runs import MODEL_DIR, export_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "mnist_paper.yaml"
# Dense (not sparse) bf16 tensor-core peaks from NVIDIA's datasheets, most specific name first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
)
# Toy sizes for --cpu-smoke: the same code path, a model that trains in seconds on CPU.
SMOKE = [
    "--model.net.block_out_channels",
    "[16, 32]",
    "--model.net.layers_per_block",
    "1",
    "--model.net.attention_levels",
    "[false, false]",
    "--model.net.mid_attention",
    "false",
    "--model.net.num_prototypes",
    "8",
    "--data.batch_size",
    "16",
    "--data.num_workers",
    "0",
    "--data.pin_memory",
    "false",
    "--trainer.accelerator",
    "cpu",
]
# (check, metric, unit): every row the table prints; tests/test_gpu_check.py asserts each is a finite number.
ROWS = (
    ("train eager", "img/s", "img/s"),
    ("train eager", "MFU", "%"),
    ("train eager", "peak memory", "GiB"),
    ("train eager", "loader wait share", "%"),
    ("train compiled", "img/s", "img/s"),
    ("train compiled", "MFU", "%"),
    ("train compiled", "peak memory", "GiB"),
    ("train compiled", "loader wait share", "%"),
    ("train compiled", "compile + warm-up", "s"),
    ("train compiled", "speed-up vs eager", "x"),
    ("edit latency", "batch 1", "s/img"),
    ("edit latency", "batched", "s/img"),
    ("faithfulness", "wall time", "s"),
    ("faithfulness", "class agreement", "%"),
    ("faithfulness", "reconstruction PSNR", "dB"),
)


class StepClock(pl.Callback):
    """Per timed step: compute (batch start -> synchronised batch end) and loader wait (the previous
    batch end -> this batch start: the GPU is idle then, since the step before it was synchronised)."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.compute = self.wait = 0.0
        self.images = self.steps = 0
        self._start: Optional[float] = None
        self._end: Optional[float] = None
        self.t_fit = time.perf_counter()
        self.warm_s = float("nan")  # fit start -> the first timed step (compilation included)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.t_fit = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if trainer.global_step == self.warmup:
            self.warm_s = now - self.t_fit
        if trainer.global_step >= self.warmup and self._end is not None:
            self.wait += now - self._end
        self._start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._sync()
        now = time.perf_counter()
        if trainer.global_step > self.warmup:  # global_step counts this step already
            self.compute += now - self._start
            self.images += batch["image"].shape[0]
            self.steps += 1
        self._end = now


def peak_tflops(device: torch.device, override: Optional[float]) -> tuple[float, str]:
    """(bf16 dense peak in TFLOP/s, where it comes from)."""
    if override:
        return override, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_BF16_TFLOPS:
            if key in name:
                return tflops, f"{name}: {key} datasheet, dense bf16"
    return measured_matmul_tflops(device), f"measured bf16 matmul peak ({device.type}; card not in the datasheet list)"


def measured_matmul_tflops(device: torch.device, n: int = 1024, reps: int = 5) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(3):
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n**3 / best / 1e12


@contextlib.contextmanager
def eager_compile_backend(enabled: bool) -> Iterator[None]:
    """--cpu-smoke: torch.compile with the "eager" backend (Dynamo traces, no Inductor code generation,
    which takes minutes on a CPU): the smoke test checks the wrapping and the table, not the kernels."""
    if not enabled:
        yield
        return
    original = torch.compile
    torch.compile = functools.partial(original, backend="eager")
    try:
        yield
    finally:
        torch.compile = original


def attempt(check: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """measure(), or NaN for every metric of `check` and the error, so one failure leaves the rest of the table."""
    try:
        return measure()
    except Exception as e:  # noqa: BLE001 - a benchmark reports any failure in its output
        print(f"{check}: FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return {**{m: math.nan for c, m, _ in ROWS if c == check}, "error": f"{type(e).__name__}: {e}"[:2000]}


def nan_if_none(v: Optional[float]) -> float:
    return math.nan if v is None else float(v)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: the process's peak RSS (Linux: KiB)


def train(
    run_dir: Path, args: list[str], compile: bool, steps: int, warmup: int, device: torch.device, smoke: bool
) -> tuple[StepClock, PatronusCLI]:
    """`steps` steps of the preset through the train.py CLI with a StepClock; exports the model."""
    cli = PatronusCLI(
        args=[
            "--config",
            str(PRESET),
            "--run_dir",
            str(run_dir),
            "--logger",
            "none",
            "--trainer.max_steps",
            str(steps),
            "--trainer.limit_val_batches",
            "0",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--checkpoint.every_n_train_steps",
            str(10 * steps),
            "--interpret_monitor.every_n_steps",
            "0",
            "--run_summary.num_images",
            "0",
            "--status.every_n_steps",
            str(max(steps // 4, 1)),
            "--model.compile",
            str(compile).lower(),
            *args,
        ]
    )
    clock = StepClock(warmup, device)
    cli.trainer.callbacks.append(clock)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with eager_compile_backend(compile and smoke):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    export_model(cli.model.net, run_dir / MODEL_DIR)
    return clock, cli


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--cpu-smoke", action="store_true", help="toy sizes on CPU: checks the script, not the GPU")
    p.add_argument("--steps", type=int, default=None, help="training steps per variant (default 400; smoke 6)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 100; smoke 2)")
    p.add_argument("--edit-batch", type=int, default=None, help="images edited together (default 64; smoke 2)")
    p.add_argument("--edit-steps", type=int, default=None, help="DDIM steps of inversion and decode (default 50; smoke 3)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak (default: by its name)")
    p.add_argument("--out", default=None, help="JSON (default benchmarks/gpu_check.json; smoke outputs/gpu_check_cpu_smoke.json)")
    p.add_argument("--work-dir", default=None, help="where the two runs go (default: a temporary folder, removed)")
    a = p.parse_args(argv)
    smoke = a.cpu_smoke
    steps = a.steps or (6 if smoke else 400)
    warmup = a.warmup if a.warmup is not None else (2 if smoke else 100)
    edit_batch, edit_steps = a.edit_batch or (2 if smoke else 64), a.edit_steps or (3 if smoke else 50)
    if not 0 < warmup < steps:
        p.error(f"--warmup {warmup} must be in 1..steps-1 (--steps {steps})")
    if not smoke and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU, or pass --cpu-smoke for the toy CPU version")
    device = torch.device("cpu" if smoke else "cuda")
    out = Path(a.out or (REPO / ("outputs/gpu_check_cpu_smoke.json" if smoke else "benchmarks/gpu_check.json")))
    args = ["--data.root", str(REPO / "data"), *(SMOKE if smoke else [])]
    t_total = time.perf_counter()

    with contextlib.ExitStack() as stack:
        work = Path(a.work_dir) if a.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-")))
        peak, peak_source = peak_tflops(device, a.peak_tflops)
        variants: dict[str, dict[str, Any]] = {}
        gflop = float("nan")
        for name, compile in (("train eager", False), ("train compiled", True)):

            def measure_training() -> dict[str, Any]:
                nonlocal gflop
                clock, cli = train(work / name.replace(" ", "_"), args, compile, steps, warmup, device, smoke)
                gflop = gflop_per_image({k: v for k, v in dict(cli.model.net.config).items() if not k.startswith("_")})
                wall = clock.compute + clock.wait
                ips = clock.images / wall
                return {
                    "img/s": ips,
                    "MFU": 100 * ips * gflop / (peak * 1e3),
                    "peak memory": peak_memory_gib(device),
                    "loader wait share": 100 * clock.wait / wall,
                    "compile + warm-up": clock.warm_s,
                    "timed steps": clock.steps,
                    "batch_size": cli.datamodule.hparams.batch_size,
                    "num_workers": cli.datamodule.hparams.num_workers,
                    "precision": str(cli.trainer.precision),
                }

            # Eager must work (the rest uses its model); a failing torch.compile is a row of the table, not a crash.
            variants[name] = measure_training() if not compile else attempt(name, measure_training)
            print(f"{name}: {variants[name]['img/s']:.0f} img/s, loader wait {variants[name]['loader wait share']:.1f}%", flush=True)
        variants["train compiled"]["speed-up vs eager"] = variants["train compiled"]["img/s"] / variants["train eager"]["img/s"]

        run = work / "train_eager"

        def measure_edits() -> dict[str, Any]:
            pipe = PatronusPipeline.from_pretrained(run / MODEL_DIR, device=device)
            return {
                "batch 1": seconds_per_edit(pipe, 1, edit_steps, 0),
                "batched": seconds_per_edit(pipe, edit_batch, edit_steps, 0),
                "batch": edit_batch,
                "steps": edit_steps,
            }

        edit = attempt("edit latency", measure_edits)
        print(f"edit latency: {edit['batch 1']:.3f} s/img alone, {edit['batched']:.4f} s/img in batches of {edit_batch}", flush=True)

        faith_args = (
            ["--num_images", "8", "--steps", "3", "--judge_images", "256"]
            if smoke
            else ["--num_images", "128", "--steps", "25", "--judge_images", "4000"]
        )

        def measure_faithfulness() -> dict[str, Any]:
            t0 = time.perf_counter()
            f = analyses_main(
                [
                    "faithfulness",
                    "--checkpoint",
                    str(run),
                    "--out",
                    str(work / "faithfulness"),
                    "--device",
                    device.type,
                    "--wandb",
                    "false",
                    "--judge_epochs",
                    "1",
                    "--num_edit_prototypes",
                    "2",
                    *faith_args,
                ]
            )
            return {
                "wall time": time.perf_counter() - t0,
                "class agreement": 100 * nan_if_none(f["agreement"]["class_agreement"]),
                "reconstruction PSNR": f["edits"]["reconstruction_psnr_db_mean"],
                "options": faith_args,
            }

        faith = attempt("faithfulness", measure_faithfulness)

    values = {**variants, "edit latency": edit, "faithfulness": faith}
    res = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "smoke": smoke,
        "preset": str(PRESET.relative_to(REPO)),
        "steps": steps,
        "warmup": warmup,
        "torch": torch.__version__,
        "gflop_per_image": gflop,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "rows": [{"check": c, "metric": m, "value": values[c][m], "unit": u} for c, m, u in ROWS],
        "details": values,
        "total_s": time.perf_counter() - t_total,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print_table(res)
    return res


def print_table(res: dict[str, Any]) -> None:
    print(
        f"\n{res['device']} | {res['preset']} | {res['steps']} steps ({res['warmup']} untimed) | "
        f"{res['gflop_per_image']:.2f} GFLOP/img | peak {res['peak_tflops']:.0f} TFLOP/s ({res['peak_source']})"
    )
    print("\n| check | metric | value | unit |\n|---|---|---|---|")
    for r in res["rows"]:
        v = r["value"]
        text = "nan" if not math.isfinite(v) else f"{v:.4g}" if abs(v) < 100 else f"{v:.0f}"
        print(f"| {r['check']} | {r['metric']} | {text} | {r['unit']} |")
    print(f"\ntotal {res['total_s']:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
