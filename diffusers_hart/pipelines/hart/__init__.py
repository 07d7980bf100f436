from .pipeline_hart import HARTPipeline

__all__ = ["HARTPipeline"]
