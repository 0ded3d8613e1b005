from patronus.models.patronus import PatronusModel
from patronus.models.prototypes import ENCODER_LAYOUTS, Activations, PrototypeEncoder, ReceptiveField
from patronus.models.unet import ConditionedUNet

__all__ = ["ENCODER_LAYOUTS", "Activations", "ConditionedUNet", "PatronusModel", "PrototypeEncoder", "ReceptiveField"]
