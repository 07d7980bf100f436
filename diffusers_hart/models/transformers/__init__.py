from .kv_cache import HARTKVCache
from .transformer_hart import HARTTransformer2DModel, HARTTransformerOutput

__all__ = ["HARTKVCache", "HARTTransformer2DModel", "HARTTransformerOutput"]
