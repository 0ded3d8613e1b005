from patronus.models.patronus import PatronusModel
from patronus.models.prototypes import ENCODER_LAYOUTS, PrototypeEncoder, ReceptiveField
from patronus.models.unet import ConditionedUNet

__all__ = ["ENCODER_LAYOUTS", "ConditionedUNet", "PatronusModel", "PrototypeEncoder", "ReceptiveField"]
