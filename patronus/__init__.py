"""patronus: interpretable prototype-conditioned diffusion models.

from patronus import PatronusPipeline
pipe = PatronusPipeline.from_pretrained("runs/mnist_cpu")
"""

from typing import Any

from patronus.models import PatronusModel, PrototypeEncoder

__all__ = ["PatronusModel", "PatronusPipeline", "PrototypeEncoder"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "PatronusPipeline":  # lazy: diffusers' pipeline machinery is only loaded when used
        from patronus.pipeline import PatronusPipeline

        return PatronusPipeline
    raise AttributeError(f"module 'patronus' has no attribute {name!r}")
