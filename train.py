"""Train a Patronus model: `python train.py` (the default run: `configs/mnist_cpu.yaml`) or
`python train.py --config configs/X.yaml [--trainer.max_steps N ...]`.

Re-running the same command resumes from RUN/checkpoints/last.ckpt. Multi-GPU / multi-node:
add `--trainer.devices N --trainer.strategy ddp [--trainer.num_nodes M]` (docs/cluster.md).
"""

from pathlib import Path

from patronus.cli.train import train_main

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "mnist_cpu.yaml"

if __name__ == "__main__":
    train_main(default_config=DEFAULT_CONFIG)
