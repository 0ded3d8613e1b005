"""Time per epoch of each CPU preset, measured: a few dozen real training steps on real files.

    python benchmarks/epoch_times.py --shared ../shared/datasets

For each preset: build it through the same CLI as train.py, train `--steps` steps (the first
`--warmup` untimed), and report img/s and train-set size / img/s. Run it alone: two CPU jobs
on 2 cores slow each other down several-fold.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl

from patronus.cli.train import PatronusCLI

# preset -> extra arguments pointing it at a local copy (relative to --shared; "" = as in the preset)
PRESETS: dict[str, list[str]] = {
    "mnist_cpu": [],
    "fashion_mnist_cpu": ["--data.root", "{shared}"],
    "pneumoniamnist_cpu": ["--data.root", "{shared}/medmnist"],
    "celeba_cpu": ["--data.root", "{shared}/celeba_subset"],
    "cifar10_cpu": ["--data.root", "{shared}/cifar10_jpeg", "--data.options", '{"layout": "folders"}', "--data.train_split", "test"],
    # No CheXpert files here: same preset (model, 64 px, grey) trained on NIH chest X-rays as a
    # stand-in for the speed; the epoch is then CheXpert-small's frontal training set.
    # No FFHQ here: the CelebA subset's face folder, read as a plain FFHQ-style folder, stands in.
    "ffhq_cpu": ["--data.root", "{shared}/celeba_subset/img_align_celeba_89x109"],
    "chexpert_cpu": [
        "--data.dataset",
        "image_folder",
        "--data.root",
        "{shared}/nih_cxr1000_64px",  # data.channels follows model.net.in_channels (1)
        "--data.options",
        "{}",
        "--data.val_split",
        "valid",
    ],
}
EPOCH_IMAGES = {"chexpert_cpu": 191_027, "ffhq_cpu": 70_000}  # CheXpert-small frontal train images; FFHQ


class StepTimer(pl.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.t0, self.images = warmup, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.t0 = time.perf_counter()
        if self.t0 is not None:
            self.images += batch["image"].shape[0]

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default="../shared/datasets")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--out", default="benchmarks/epoch_times.json")
    a = p.parse_args()
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.is_file() else {}  # re-running some presets updates them
    for name in a.presets:
        preset = Path("configs") / f"{name}.yaml"
        if not preset.is_file():
            continue
        extra = [x.replace("{shared}", a.shared) for x in PRESETS.get(name, [])]
        with tempfile.TemporaryDirectory() as run:
            try:
                cli = PatronusCLI(
                    args=[
                        "--config",
                        str(preset),
                        *extra,
                        "--logger",
                        "none",
                        "--run_dir",
                        run,
                        "--trainer.max_steps",
                        str(a.steps),
                        "--trainer.limit_val_batches",
                        "0",
                        "--checkpoint.save_last",
                        "false",
                        "--trainer.enable_progress_bar",
                        "false",
                    ]
                )
                timer = StepTimer(a.warmup)
                cli.trainer.callbacks.append(timer)
                cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            except (SystemExit, FileNotFoundError, ValueError) as e:
                results[name] = {"skipped": str(e)[:200]}
                out.write_text(json.dumps(results, indent=2))
                continue
        n_train = EPOCH_IMAGES.get(name, len(cli.datamodule.train_set))
        ips = timer.images / timer.seconds
        results[name] = {
            "train_images": n_train,
            "img_per_s": round(ips, 1),
            "epoch_minutes": round(n_train / ips / 60, 2),
            "image_size": cli.model.net.config.image_size,
            "batch_size": cli.datamodule.hparams.batch_size,
        }
        print(name, json.dumps(results[name]), flush=True)
        out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
