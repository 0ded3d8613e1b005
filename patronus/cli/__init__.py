"""Every command line of the package: `train.py` (LightningCLI), `sample.py` and `python -m patronus`.

The only place that knows parsers, exit codes and output-file layouts of commands.
"""
