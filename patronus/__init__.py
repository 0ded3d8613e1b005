"""patronus: interpretable prototype-conditioned diffusion models."""

from patronus.models import PatronusModel, PrototypeEncoder

__all__ = ["PatronusModel", "PrototypeEncoder"]
__version__ = "0.1.0"
