"""The one place that decides whether an op runs its fused Triton kernel or its torch reference.

Triton is optional: nothing in `diffusers_hart` imports it at module level. The kernels live in
`diffusers_hart.ops.kernels`, which is imported only after `use_fused` said yes, so an install without
triton (or a CPU-only machine) never touches it.

Rules, checked in this order:

1. `DIFFUSERS_HART_DISABLE_TRITON=1` (also "true"/"yes"/"on") forces the torch references everywhere:
   the switch to rule a kernel out when an image looks wrong.
2. Every tensor must be float16, bfloat16 or float32 (the dtypes the kernels are written and tested for).
3. All tensors on one CUDA device -> fused. All on the CPU -> fused only under `TRITON_INTERPRET=1`, Triton's
   numpy interpreter, which is how the kernels are tested on machines without a GPU (it is far slower than
   torch, so it is never chosen otherwise).
4. `import triton` must succeed.
"""

import functools
import importlib
import os
from typing import Optional

import torch

DISABLE_TRITON_ENV = "DIFFUSERS_HART_DISABLE_TRITON"
TRITON_INTERPRET_ENV = "TRITON_INTERPRET"
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Kernels that keep a whole row in one program's registers (RMSNorm, the sampler) take rows up to this width;
# wider rows use the torch reference. HART's widest rows are 4096 (vocabulary) and 1536 (hidden size).
MAX_FUSED_ROW = 16384

_TRUE = ("1", "true", "yes", "on")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in _TRUE


def triton_disabled() -> bool:
    """Whether the user forced the torch references with `DIFFUSERS_HART_DISABLE_TRITON=1`."""
    return _env_flag(DISABLE_TRITON_ENV)


def triton_interpreting() -> bool:
    """Whether Triton would run kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return _env_flag(TRITON_INTERPRET_ENV)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether `import triton` works here; cached, since the answer cannot change within a process."""
    try:
        importlib.import_module("triton")
    except Exception:  # ImportError, but also a broken install failing inside its own import
        return False
    return True


def use_fused(*tensors: Optional[torch.Tensor]) -> bool:
    """True when the fused kernel should run on `tensors` (`None` entries are ignored); see the module docstring."""
    tensors = [t for t in tensors if t is not None]
    if not tensors or triton_disabled():
        return False
    if any(t.dtype not in FUSED_DTYPES for t in tensors):
        return False
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return False
    device_type = next(iter(devices)).type
    if device_type == "cuda":
        pass
    elif device_type == "cpu":
        if not triton_interpreting():
            return False
    else:
        return False
    return triton_available()
