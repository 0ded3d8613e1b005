"""Train a Patronus model: `python train.py --config configs/mnist_cpu.yaml [--trainer.max_steps N ...]`.

Re-running the same command resumes from RUN/checkpoints/last.ckpt. Multi-GPU / multi-node:
add `--trainer.devices N --trainer.strategy ddp [--trainer.num_nodes M]`.
"""

from patronus.cli.train import train_main

if __name__ == "__main__":
    train_main()
