from .autoencoders import HARTAutoEncoder
from .transformers import HARTTransformer2DModel

__all__ = ["HARTAutoEncoder", "HARTTransformer2DModel"]
