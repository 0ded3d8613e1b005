"""Loader throughput: images/s per DataLoader worker for every GPU preset's data, and the workers
each preset needs to keep its GPU fed.

    python benchmarks/loader_throughput.py                                  # every configs/*_paper.yaml
    python benchmarks/loader_throughput.py --presets celeba_paper --workers 0 4 8
    python benchmarks/loader_throughput.py --prepare-into /tmp/prepared                    # + each preset prepared
    python benchmarks/loader_throughput.py --prepared celeba_paper=/data/celeba_prepared     # + a folder prepared earlier

For each preset: its `data:` block (dataset, batch size, options) read through the package's own
PatronusDataModule at the model's resolution, pointed at the real files in --shared (stand-ins
where the preset's dataset is not staged: see STAND_INS). The train loader (shuffled, as in
training) is timed over --batches batches after --warmup batches, for each --workers count;
"per worker" is img/s divided by the workers (0 = loading in the training process, counted as one).

The step rate to keep up with: on a GPU, measured (the preset's model, bf16 autocast, its batch
size, synthetic images: the GPU alone); without one, GFLOP per training image (forward + backward,
torch's FlopCounterMode on the meta device) at an assumed MFU of a stated peak (--mfu, --peak-tflops).
Workers needed = ceil(step img/s / per-worker img/s × --headroom).

`--prepare-into DIR` also writes each preset's train split there with the package's own `prepare`
(at the preset's resolution, as `python -m patronus prepare --train_config configs/PRESET.yaml`
does; a finished folder is reused) and times it read back as training reads it: the DataModule
with `data.dataset: streaming` (litdata's StreamingDataLoader, decoded to the same batch dict).
`--prepared PRESET=DIR` times a folder prepared earlier. Run it alone on the machine: other jobs on
the cores lower every number.
Writes benchmarks/loader_throughput.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from patronus.data.datamodule import PatronusDataModule
from patronus.data.streaming import META_FILE, prepare
from patronus.diffusion import diffusion_loss
from patronus.models.patronus import PatronusModel

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
H100_DENSE_BF16_TFLOPS = 989.0  # H100 SXM, dense bf16 tensor-core peak (NVIDIA datasheet; 1979 is with sparsity)

# Preset -> data overrides pointing it at --shared ({shared}; `options` are merged into the preset's, {} clears
# them), and why the files differ from the preset's own dataset.
STAND_INS: dict[str, tuple[dict[str, Any], str]] = {
    "mnist_paper": ({"root": "{shared}"}, ""),
    "fashion_mnist_paper": ({"root": "{shared}"}, ""),
    "pneumoniamnist_paper": ({"root": "{shared}/medmnist"}, ""),
    "cifar10_paper": (
        {"root": "{shared}/cifar10_jpeg", "train_split": "test", "options": {"layout": "folders"}},
        "CIFAR-10 test split as JPEG folders (the python batches are not staged)",
    ),
    "celeba_paper": (
        {
            "root": "{shared}/celeba_subset",
            "holdout": 0.05,
            "options": {"image_dir": "img_align_celeba_89x109", "attr_file": "list_attr_celeba_000001-010000.txt", "partition_file": None},
        },
        "10,000-image subset at half resolution (89x109 JPEGs decode ~4x faster than the 178x218 originals)",
    ),
    "ffhq_paper": (
        {"root": "{shared}/celeba_subset/img_align_celeba_89x109"},
        "CelebA subset's 89x109 JPEG faces as an FFHQ-style folder (FFHQ thumbnails are 128x128 PNGs)",
    ),
    "chexpert_paper": (
        {"dataset": "image_folder", "root": "{shared}/nih_cxr1000_64px", "val_split": "valid", "options": {}},
        "NIH ChestX-ray14 64 px PNGs upsampled to the preset's size (CheXpert-small JPEGs are ~390x320: decoding them costs more)",
    ),
}


def preset_config(name: str) -> dict[str, Any]:
    path = CONFIGS / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such preset; expected one of {sorted(p.stem for p in CONFIGS.glob('*_paper.yaml'))}")
    return yaml.safe_load(path.read_text())


def data_module(cfg: dict[str, Any], overrides: dict[str, Any], shared: str, num_workers: int) -> PatronusDataModule:
    """The preset's PatronusDataModule (its data: block, model resolution and channels), with overrides."""
    data = dict(cfg.get("data") or {})
    for key, value in overrides.items():
        value = value.replace("{shared}", shared) if isinstance(value, str) else value
        data[key] = {**(data.get(key) or {}), **value} if key == "options" and value else value
    net = cfg["model"]["net"]
    data.update(
        image_size=net["image_size"], channels=net["in_channels"], num_workers=num_workers, pin_memory=torch.cuda.is_available()
    )  # pinning needs a GPU; the presets pin
    return PatronusDataModule(**data)


def batch_size_of(batch: Any) -> int:
    """Images in a collated batch (a tensor, a dict of tensors, or a list of items)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return batch_size_of(batch.get("image", next(iter(batch.values()))))
    if isinstance(batch, (list, tuple)):
        return batch_size_of(batch[0]) if batch and isinstance(batch[0], torch.Tensor) and len(batch) in (2, 3) else len(batch)
    return 1


def time_loader(loader: Iterable, warmup: int, batches: int) -> dict[str, float]:
    """img/s over `batches` batches after `warmup` untimed ones (worker start-up, first file opens);
    a small dataset is iterated again, as training does across epochs. Loading in this process
    (num_workers=0) runs on one thread, as each worker process does (PyTorch sets 1 thread there)."""
    threads = torch.get_num_threads()
    if getattr(loader, "num_workers", 0) == 0:
        torch.set_num_threads(1)
    try:
        return _time_loader(loader, warmup, batches)
    finally:
        torch.set_num_threads(threads)
        gc.collect()  # shut this loader's workers down here, not in a worker forked for the next one


def _time_loader(loader: Iterable, warmup: int, batches: int) -> dict[str, float]:
    t_start = time.perf_counter()
    it = iter(loader)

    def next_batch() -> Any:
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(loader)
            try:
                return next(it)
            except StopIteration:
                raise ValueError("the loader yields no batch: fewer items than one batch (drop_last)") from None

    for _ in range(warmup):
        next_batch()
    t0, images = time.perf_counter(), 0
    for _ in range(batches):
        images += batch_size_of(next_batch())
    seconds = time.perf_counter() - t0
    del it
    return {"img_per_s": images / seconds, "images": images, "seconds": seconds, "warmup_s": t0 - t_start}


def gflop_per_image(net_cfg: dict[str, Any]) -> float:
    """Training GFLOP per image (loss forward + backward) of a model config, counted on the meta device."""
    with torch.device("meta"):
        net = PatronusModel(**net_cfg)
        x = torch.zeros(2, net_cfg.get("in_channels", 1), net_cfg["image_size"], net_cfg["image_size"])
    with FlopCounterMode(display=False) as counter:
        loss, _ = diffusion_loss(net, net.noise_scheduler(), x)
        loss.backward()
    return counter.get_total_flops() / 2 / 1e9


def measured_step_rate(net_cfg: dict[str, Any], batch: int, steps: int = 10) -> float:
    """Training img/s of the preset's model on this GPU: bf16 autocast, AdamW, synthetic images (no loader)."""
    device = torch.device("cuda")
    net = PatronusModel(**net_cfg).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    sched = net.noise_scheduler()
    x = torch.rand(batch, net_cfg.get("in_channels", 1), net_cfg["image_size"], net_cfg["image_size"], device=device) * 2 - 1

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = diffusion_loss(net, sched, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    rate = steps * batch / (time.perf_counter() - t0)
    return rate


def prepared_data_module(cfg: dict[str, Any], folder: str, num_workers: int) -> PatronusDataModule:
    """The preset's training data read from a `prepare` folder, exactly as `--data.dataset streaming` trains on it."""
    data = cfg.get("data") or {}
    net = cfg["model"]["net"]
    dm = PatronusDataModule(
        dataset="streaming",
        root=folder,
        image_size=net["image_size"],
        channels=net["in_channels"],
        batch_size=data.get("batch_size", 64),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        train_split="train",
        val_split="train",  # only the train split is prepared and timed
        val_subset=1,
    )
    dm.setup("fit")
    return dm


def prepare_train_split(dm: PatronusDataModule, folder: Path) -> None:
    """Write the preset's train split (as its DataModule reads it) to `folder`, unless a finished one is there."""
    if (folder / META_FILE).is_file():
        return
    h = dm.hparams
    split = dm.build_split(h.train_split)
    t0 = time.perf_counter()
    prepare({"train": split}, str(folder), {"dataset": h.dataset, "root": str(h.root), "options": h.options}, overwrite=True)
    print(f"  prepared {len(split)} images into {folder} in {time.perf_counter() - t0:.0f} s", flush=True)


def workers_needed(step_rate: float, per_worker: float, headroom: float) -> Optional[int]:
    if not (per_worker > 0 and math.isfinite(per_worker) and math.isfinite(step_rate)):
        return None
    return max(1, math.ceil(step_rate * headroom / per_worker))


def per_worker_rate(rows: dict[str, dict[str, float]]) -> tuple[float, int]:
    """(img/s per worker, at how many workers): the largest worker count measured, IPC cost included."""
    best = max(rows, key=int)
    return rows[best]["img_per_s"] / max(int(best), 1), int(best)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument(
        "--shared",
        default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets"),
        help="the staged datasets folder (../shared/datasets from the project root)",
    )
    p.add_argument("--presets", nargs="+", default=list(STAND_INS), help="configs/<name>.yaml GPU presets")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=sorted({0, 1, min(cores, 8)}),
        help="DataLoader worker counts to time (per worker: the largest; keep it <= the free cores)",
    )
    p.add_argument("--batches", type=int, default=50, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (worker start-up)")
    p.add_argument(
        "--cold", action="store_true", help="time the first read of each file (storage speed) instead of reading them once untimed first"
    )
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation, without a GPU to measure on")
    p.add_argument("--peak-tflops", type=float, default=H100_DENSE_BF16_TFLOPS, help="the GPU's dense bf16 peak (assumed)")
    p.add_argument("--headroom", type=float, default=1.25, help="loader capacity / step rate wanted (jitter, augmentation)")
    p.add_argument(
        "--prepare-into", metavar="DIR", help="write each preset's train split here with `prepare` (reused when finished) and time it too"
    )
    p.add_argument(
        "--prepared", action="append", default=[], metavar="PRESET=DIR", help="a folder `python -m patronus prepare` wrote, to time too"
    )
    p.add_argument(
        "--measure-gpu",
        action=argparse.BooleanOptionalAction,
        default=torch.cuda.is_available(),
        help="measure each preset's step rate on this GPU instead of assuming it from FLOPs",
    )
    p.add_argument("--out", default=str(Path(__file__).with_name("loader_throughput.json")))
    a = p.parse_args(argv)
    if a.batches < 1 or a.warmup < 0 or any(w < 0 for w in a.workers):
        p.error("--batches must be >= 1, --warmup >= 0 and every --workers >= 0")

    res: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "usable_cores": cores,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "settings": {
            "batches": a.batches,
            "warmup": a.warmup,
            "workers": a.workers,
            "headroom": a.headroom,
            "page_cache": "cold: first reads" if a.cold else "warm: one untimed pass over the same batches first",
        },
        "step_rate_source": (
            "measured on this GPU: bf16 autocast, the preset's batch, synthetic images"
            if a.measure_gpu
            else f"assumed: {a.mfu:.0%} MFU of {a.peak_tflops:g} TFLOP/s (dense bf16 peak) / training GFLOP per "
            "image (forward + backward, FlopCounterMode)"
        ),
        "presets": {},
    }
    print(f"step rate: {res['step_rate_source']}", flush=True)
    for name in a.presets:
        cfg = preset_config(name)
        overrides, note = STAND_INS.get(name, ({}, "the preset's own data.root"))
        net_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg["model"]["net"].items()}
        entry: dict[str, Any] = {
            "dataset": cfg["data"]["dataset"],
            "stand_in": note or None,
            "image_size": net_cfg["image_size"],
            "channels": net_cfg.get("in_channels", 1),
            "batch_size": cfg["data"].get("batch_size", 64),
            "preset_num_workers": cfg["data"].get("num_workers", 0),
            "raw": {},
        }
        try:
            dm = data_module(cfg, overrides, a.shared, a.workers[0])
            dm.setup("fit")
            entry["train_images"] = len(dm.train_set)
            if not a.cold:  # the same seeded shuffle reads the same files in every measurement: cache them once
                dm.hparams.num_workers = max(a.workers)
                time_loader(dm.train_dataloader(), a.warmup, a.batches)
            for w in a.workers:
                dm.hparams.num_workers = w  # the same datasets behind another loader
                entry["raw"][str(w)] = time_loader(dm.train_dataloader(), a.warmup, a.batches)
                print(f"{name}: {w} workers: {entry['raw'][str(w)]['img_per_s']:.0f} img/s", flush=True)
        except (FileNotFoundError, ValueError) as e:
            entry["skipped"] = str(e)[:300]
            print(f"{name}: skipped ({entry['skipped']})", flush=True)
        if a.prepare_into and "skipped" not in entry:  # the same DataModule's train split, for the prepared timing below
            prepare_train_split(dm, Path(a.prepare_into) / name)
        entry["gflop_per_image"] = gflop_per_image(net_cfg)
        entry["step_img_per_s"] = (
            measured_step_rate(net_cfg, entry["batch_size"]) if a.measure_gpu else a.mfu * a.peak_tflops * 1e3 / entry["gflop_per_image"]
        )
        if entry["raw"]:
            rate, at = per_worker_rate(entry["raw"])
            entry["raw_img_per_s_per_worker"], entry["per_worker_measured_at"] = rate, at
            entry["workers_needed"] = workers_needed(entry["step_img_per_s"], rate, a.headroom)
        res["presets"][name] = entry

    res["prepared"] = {}
    specs = [spec.partition("=")[::2] for spec in a.prepared]
    if a.prepare_into:
        specs += [(name, str(Path(a.prepare_into) / name)) for name, e in res["presets"].items() if "skipped" not in e]
    for preset, folder in specs:
        if not folder:
            p.error(f"--prepared {preset}: expected PRESET=DIR")
        item: dict[str, Any] = {"folder": folder, "by_workers": {}}
        try:
            cfg = preset_config(preset)
            item["batch_size"] = (cfg.get("data") or {}).get("batch_size", 64)
            dm = prepared_data_module(cfg, folder, max(a.workers))
            if not a.cold:  # read the chunks once untimed, as for the raw files
                time_loader(dm.train_dataloader(), a.warmup, a.batches)
            for w in a.workers:
                dm.hparams.num_workers = w  # the same prepared split behind another loader
                item["by_workers"][str(w)] = time_loader(dm.train_dataloader(), a.warmup, a.batches)
                print(f"{preset} prepared: {w} workers: {item['by_workers'][str(w)]['img_per_s']:.0f} img/s", flush=True)
        except (FileNotFoundError, ValueError, OSError, ImportError) as e:
            item["skipped"] = f"{folder}: {str(e)[:300]}"
            print(f"prepared {preset}: skipped: {item['skipped']}", flush=True)
        if item["by_workers"] and "skipped" not in item:
            item["img_per_s_per_worker"], item["per_worker_measured_at"] = per_worker_rate(item["by_workers"])
            if preset in res["presets"]:
                item["workers_needed"] = workers_needed(res["presets"][preset]["step_img_per_s"], item["img_per_s_per_worker"], a.headroom)
        res["prepared"][preset] = item

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print_table(res, a)
    return res


def print_table(res: dict[str, Any], a: argparse.Namespace) -> None:
    def f(v: Any, fmt: str = ".0f") -> str:
        return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)

    print(f"\nstep rate: {res['step_rate_source']}; workers needed = ceil(step img/s x {a.headroom:g} / img/s per worker)")
    print(f"machine: {res['machine']}")
    cols = " | ".join(f"img/s @{w}w" for w in a.workers)
    print(f"\n| preset | px | batch | {cols} | img/s per worker | GFLOP/img | step img/s | workers needed | preset num_workers |")
    print("|---|---|---|" + "---|" * len(a.workers) + "---|---|---|---|---|")
    for name, e in res["presets"].items():
        rates = " | ".join(f(e["raw"].get(str(w), {}).get("img_per_s")) for w in a.workers)
        print(
            f"| {name} | {e['image_size']} | {e['batch_size']} | {rates} | {f(e.get('raw_img_per_s_per_worker'))} | "
            f"{e['gflop_per_image']:.1f} | {f(e['step_img_per_s'])} | {f(e.get('workers_needed'), 'd')} | {e['preset_num_workers']} |"
        )
    for spec, item in res["prepared"].items():
        if "skipped" in item:
            print(f"| prepared {spec} | skipped: {item['skipped']} |")
            continue
        rates = " | ".join(f(item["by_workers"].get(str(w), {}).get("img_per_s")) for w in a.workers)
        print(
            f"| prepared {spec} | | {item['batch_size']} | {rates} | {f(item.get('img_per_s_per_worker'))} | | | "
            f"{f(item.get('workers_needed'), 'd')} | |"
        )
    notes = [f"{n}: {e['stand_in']}" for n, e in res["presets"].items() if e.get("stand_in")]
    notes += [f"{n}: skipped: {e['skipped']}" for n, e in res["presets"].items() if e.get("skipped")]
    if notes:
        print("\nstand-ins and skips:\n  " + "\n  ".join(notes))


if __name__ == "__main__":
    main()
