"""HART (Hybrid Autoregressive Transformer) for the diffusers ecosystem.

Every class a converted folder's `model_index.json` names is importable from here, which is
where diffusers looks them up (`diffusers_hart.<ClassName>`).
"""

from .models import HARTAutoEncoder, HARTTransformer2DModel
from .pipelines import HARTPipeline
from .schedulers import HARTResidualDiffusionScheduler

__version__ = "0.1.0"

__all__ = ["HARTAutoEncoder", "HARTPipeline", "HARTResidualDiffusionScheduler", "HARTTransformer2DModel"]
