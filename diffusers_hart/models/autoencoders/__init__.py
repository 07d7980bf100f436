from .autoencoder_hart import HARTAutoEncoder
from .hybrid_quantizer import HARTHybridQuantizer


__all__ = ["HARTAutoEncoder", "HARTHybridQuantizer"]
