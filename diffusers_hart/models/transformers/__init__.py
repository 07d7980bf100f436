from .kv_cache import HARTKVCache
from .transformer_hart import HARTPromptCondition, HARTTransformer2DModel, HARTTransformerOutput

__all__ = ["HARTKVCache", "HARTPromptCondition", "HARTTransformer2DModel", "HARTTransformerOutput"]
