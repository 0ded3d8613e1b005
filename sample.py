"""Sample, invert and edit with a trained Patronus model.

python sample.py                      # the default run (runs/mnist_cpu) -> outputs/mnist_cpu
python sample.py --checkpoint runs/mnist_cpu --out outputs/mnist_cpu --edit "[3=q99, 7=0]"
"""

from patronus.cli.sample import main as sample_main

if __name__ == "__main__":
    sample_main()
