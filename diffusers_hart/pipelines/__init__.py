from .hart import HARTPipeline

__all__ = ["HARTPipeline"]
