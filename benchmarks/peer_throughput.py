"""Training throughput of patronus vs the paper's official code, interleaved in one process.

    git clone https://github.com/nina-weng/patronus /tmp/patronus-paper
    python benchmarks/peer_throughput.py --paper_code /tmp/patronus-paper    # CPU, batch 64, ~10 min on 2 cores

Run it alone on the machine: the implementations share it in turns, so other load slows each
block by a different amount.

What is measured: img/s of one training step of each implementation on the same random batch
(B x 1 x 32 x 32 in [-1, 1], MNIST-like, K = 30 prototypes of D = 128), at the paper-sized UNet
64·(1,2,4,4), 2 blocks per level. A step is everything from the clean batch to updated weights:
timestep draw, noising, prototype encoder on x0, UNet on x_t, loss, backward, optimizer step.
No data loading, logging or sampling.

- patronus: `benchmarks/benchmark.py`'s `PAPER` model and `train_step_fn` (AdamW, `diffusion_loss`),
  in fp32 and in bf16 autocast.
- paper: `Patronus_Unet` + `SimpleDiffusion` + `PrototypeDistinctLoss` imported from a local clone
  (`--paper_code`, never vendored here), driven like `train/train_patronus.py`'s `train_one_epoch`:
  encoder on x0 outside autocast, UNet and losses (MSE + λ·distinct, λ from `train_config.py`)
  inside `torch.cuda.amp.autocast()` with a GradScaler, AdamW. That autocast is CUDA-only (fp16),
  so on the CPU the paper code runs in fp32, as its script would; on CUDA it is also timed as shipped.
  Its `ModelConfig` is read from the clone's `train/train_config.py` (parsed, not imported: that
  module needs the user's `global_config.py`). Two variants by default (`--paper_attention`):
  `matched` puts attention at the third level like patronus's preset (and `Patronus_Unet`'s own
  default), the like-for-like comparison; `shipped` uses `ModelConfig.APPLY_ATTENTION` as the
  repository ships it (no attention in the levels; the bottleneck keeps its attention, like
  patronus's mid block). Each model keeps its own remaining settings: the paper's dropout 0.1 and
  per-block condition projection, patronus's dropout 0; patronus's benchmark step leaves out the
  distinct loss (a K x K cosine matrix; the paper's config weighs it 0 but computes it).

Interleaving: after `--warmup` untimed steps of each, every round times one block of `--steps`
steps of each implementation, the order rotated by one each round so that every implementation
is first equally often when `--rounds` is a multiple of their number (4 on CPU, hence 8 rounds).
Reported: per-round img/s, the median of each, and ratios (ratio of medians, and median of the
per-round paired ratios, which cancels slow drifts of the machine's speed), with params and
GFLOP/img (FlopCounterMode, one whole step on 4 images) of each model. Writes
`benchmarks/peer_throughput.json` (with the paper code's commit and any local edits to it).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ itself, for `benchmark`
from benchmark import PAPER, flops_per_image, sync, train_step_fn  # noqa: E402

from patronus.models.patronus import PatronusModel  # noqa: E402

PAPER_URL = "https://github.com/nina-weng/patronus"
IMG_SHAPE = (1, 32, 32)  # MNIST-like: the paper's MNIST/FMNIST branch of TrainingConfig
NUM_PROTOS = 30
# The paper's MNIST prototype encoder (TrainingConfig's plb_* for MNIST; = patronus's "paper32" layout).
PLB = dict(
    plb_channel_inputs=[1, 32, 64, 64, 128],
    plb_layer_filter_sizes=[3, 3, 3, 3],
    plb_layer_strides=[2, 1, 1, 1],
    plb_layer_paddings=[1, 0, 0, 0],
)
MATCHED_ATTENTION = tuple(PAPER["attention_levels"])

Step = Callable[[], None]


def class_defaults(path: Path, cls: str) -> dict[str, Any]:
    """Literal class-level defaults (`NAME: type = value`) of a dataclass in a source file, without importing it."""
    tree = ast.parse(path.read_text())
    body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None)
    if body is None:
        raise SystemExit(f"{path}: no class {cls}; is --paper_code a clone of {PAPER_URL}?")
    out: dict[str, Any] = {}
    for n in body:  # top level of the class body only (the per-dataset `if` branches are skipped)
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.value is not None:
            with contextlib.suppress(ValueError):
                out[n.target.id] = ast.literal_eval(n.value)
    return out


def git_info(repo: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "HEAD") or "unknown (not a git clone)",
        "origin": git("remote", "get-url", "origin"),
        "modified_files": [ln[3:] for ln in git("status", "--porcelain", "--untracked-files=no").splitlines()],
    }


def import_paper(clone: Path) -> tuple[type, type, type]:
    """Patronus_Unet, SimpleDiffusion, PrototypeDistinctLoss from the clone (its `models/` package)."""
    sys.path.insert(0, str(clone))
    import models.patronus_unet as mod
    from models.diffusion import SimpleDiffusion
    from models.loss_fn import PrototypeDistinctLoss
    from models.patronus_unet import Patronus_Unet

    if not Path(mod.__file__).resolve().is_relative_to(clone):
        raise SystemExit(f"imported models.patronus_unet from {mod.__file__}, not from {clone}")
    return Patronus_Unet, SimpleDiffusion, PrototypeDistinctLoss


def paper_model(Unet: type, mc: dict[str, Any], attention: tuple[bool, ...]) -> nn.Module:
    """Constructed with the arguments `train_patronus.py` passes (ModelConfig + MNIST TrainingConfig)."""
    return Unet(
        input_channels=IMG_SHAPE[0],
        output_channels=IMG_SHAPE[0],
        base_channels=mc["BASE_CH"],
        base_channels_multiples=tuple(mc["BASE_CH_MULT"]),
        apply_attention=attention,
        dropout_rate=mc["DROPOUT_RATE"],
        time_multiple=mc["TIME_EMB_MULT"],
        num_proto=NUM_PROTOS,
        prototype_vector_shape=(1, 128),
        encoder_type="basic_conv",
        img_size=IMG_SHAPE,
        **PLB,
    )


def paper_step_fn(model: nn.Module, sd: Any, distinct: nn.Module, tc: dict[str, Any], x0: torch.Tensor, amp: bool) -> Step:
    """One iteration of `train_one_epoch` (minus tqdm/wandb/MeanMetric/.item()); `amp`: its CUDA fp16 autocast + GradScaler."""
    dev = x0.device
    opt = torch.optim.AdamW(model.parameters(), lr=tc["LR"])
    scaler = torch.amp.GradScaler(dev.type, enabled=amp)
    mse = nn.MSELoss()
    lam_denoise, lam_distinct = tc["loss_lambda"]

    def step() -> None:
        ts = torch.randint(low=1, high=tc["TIMESTEPS"], size=(x0.shape[0],), device=dev)
        xts, gt_noise = sd.forward_diffusion(x0, ts)
        proact = model.get_proact(x0)  # encoder on the clean image, outside autocast (as shipped)
        with torch.autocast(dev.type, dtype=torch.float16) if amp else contextlib.nullcontext():
            pred = model(xts, ts, given_cond_vector=proact)
            loss = lam_denoise * mse(gt_noise, pred) + lam_distinct * distinct(model.get_learned_prototypes())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def step_flops_per_image(make_step: Callable[[torch.Tensor], Step], x: torch.Tensor) -> float:
    """GFLOP per image of a whole step (matmul/conv/attention as FlopCounterMode counts them) on a small batch."""
    step = make_step(x)
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / x.shape[0] / 1e9


def time_block(step: Step, n: int, device: torch.device) -> float:
    gc.collect()
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return time.perf_counter() - t


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    return f"{cpu}, {torch.get_num_threads()} torch threads"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper_code", type=Path, help=f"local clone of {PAPER_URL}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8, help="timed blocks of each implementation")
    p.add_argument("--steps", type=int, default=4, help="training steps per timed block")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each implementation before round 1")
    p.add_argument("--paper_attention", nargs="+", choices=["matched", "shipped"], default=["matched", "shipped"])
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "peer_throughput.json")
    a = p.parse_args()
    if a.paper_code is None:
        sys.exit(f"needs the paper's code: git clone {PAPER_URL} DIR, then pass --paper_code DIR")
    clone = a.paper_code.resolve()
    if not (clone / "models" / "patronus_unet.py").is_file():
        sys.exit(f"{clone}/models/patronus_unet.py not found; --paper_code must be a clone of {PAPER_URL}")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    Unet, SimpleDiffusion, PrototypeDistinctLoss = import_paper(clone)
    mc = class_defaults(clone / "train" / "train_config.py", "ModelConfig")
    tc = class_defaults(clone / "train" / "train_config.py", "TrainingConfig")
    attention = {"matched": MATCHED_ATTENTION, "shipped": tuple(mc["APPLY_ATTENTION"])}

    torch.manual_seed(0)
    x = torch.rand(a.batch, *IMG_SHAPE, device=device) * 2 - 1  # one batch for all
    x_small = x[:4]

    # name -> (model, make_step(x)); patronus through benchmark.py, the paper through its own classes.
    makers: dict[str, tuple[nn.Module, Callable[[torch.Tensor], Step]]] = {}
    for prec in ("fp32", "bf16"):
        torch.manual_seed(0)
        net = PatronusModel(**PAPER).to(device).train()
        makers[f"patronus_{prec}"] = (net, lambda xb, net=net, prec=prec: train_step_fn(net, xb, prec)[0])
    sd = SimpleDiffusion(num_diffusion_timesteps=tc["TIMESTEPS"], img_shape=IMG_SHAPE, device=device)
    distinct = PrototypeDistinctLoss(distance_type="cosine", margin=tc["distinct_margin"])
    amps = [False, True] if device.type == "cuda" else [False]  # the paper's autocast is CUDA-only
    for att in a.paper_attention:
        for amp in amps:
            torch.manual_seed(0)
            m = paper_model(Unet, mc, attention[att]).to(device).train()
            name = f"paper_{att}_{'amp_fp16' if amp else 'fp32'}"
            makers[name] = (m, lambda xb, m=m, amp=amp: paper_step_fn(m, sd, distinct, tc, xb, amp))

    info: dict[str, dict[str, Any]] = {}
    for name, (m, make) in makers.items():
        fp = flops_per_image(m, x_small) if name.startswith("patronus") else step_flops_per_image(make, x_small)
        info[name] = {"params_M": sum(q.numel() for q in m.parameters()) / 1e6, "gflop_per_img": fp}
        m.zero_grad(set_to_none=True)
    steps = {name: make(x) for name, (_, make) in makers.items()}

    names = list(steps)
    for name in names:
        time_block(steps[name], a.warmup, device)
    ips: dict[str, list[float]] = {n: [] for n in names}
    for r in range(a.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            ips[name].append(a.steps * a.batch / time_block(steps[name], a.steps, device))
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{n} {ips[n][-1]:.1f}" for n in names) + " img/s", flush=True)

    med = {n: statistics.median(v) for n, v in ips.items()}
    ratios: dict[str, dict[str, float]] = {}
    for ours in (n for n in names if n.startswith("patronus")):
        for theirs in (n for n in names if n.startswith("paper")):
            paired = [o / t for o, t in zip(ips[ours], ips[theirs])]
            ratios[f"{ours} / {theirs}"] = {"ratio_of_medians": med[ours] / med[theirs], "median_paired_ratio": statistics.median(paired)}

    res = {
        "device": device_name(device),
        "torch": torch.__version__,
        "batch": a.batch,
        "image_shape": list(IMG_SHAPE),
        "num_prototypes": NUM_PROTOS,
        "rounds": a.rounds,
        "steps_per_block": a.steps,
        "warmup_steps": a.warmup,
        "paper_code": {
            "url": PAPER_URL,
            **git_info(clone),
            "model_config": mc,
            "attention": {k: list(attention[k]) for k in a.paper_attention},
        },
        "patronus_model": PAPER,
        "models": info,
        "img_per_s": ips,
        "median_img_per_s": med,
        "ratios": ratios,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2, default=list))
    print(
        f"\n{res['device']}, torch {res['torch']}, batch {a.batch}, {a.rounds} rounds x {a.steps} steps, paper code "
        f"{res['paper_code']['commit'][:12]}\n"
    )
    print("| implementation | params (M) | GFLOP/img | median img/s | per-round img/s |\n|---|---|---|---|---|")
    for n in names:
        print(
            f"| {n} | {info[n]['params_M']:.1f} | {info[n]['gflop_per_img']:.2f} | {med[n]:.1f} | "
            + " ".join(f"{v:.1f}" for v in ips[n])
            + " |"
        )
    print("\n| ratio | of medians | median of per-round ratios |\n|---|---|---|")
    for k, v in ratios.items():
        print(f"| {k} | {v['ratio_of_medians']:.2f} | {v['median_paired_ratio']:.2f} |")
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
