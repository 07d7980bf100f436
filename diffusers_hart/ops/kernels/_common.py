"""Launch helpers shared by the host functions of the kernels."""

import contextlib

import torch
import triton

from ..dispatch import MAX_FUSED_ROW

# Every launch names its floating-point contraction explicitly (Triton 3.9 warns otherwise). Kernels that must
# round exactly as the torch reference's separate ops do (a * b + c rounded twice) pass `EXACT`.
EXACT = dict(enable_fp_fusion=False)


def row_block(width: int, name: str) -> int:
    """Power-of-two block covering a row of `width` elements, with a clear error past what one program holds."""
    if width > MAX_FUSED_ROW:
        raise ValueError(f"{name} has rows of {width} elements; the fused kernel holds at most {MAX_FUSED_ROW}.")
    return triton.next_power_of_2(width)


def warps_for(block: int) -> int:
    """Warps for a program that reduces over a row of `block` elements (about 8 to 16 elements per thread)."""
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def device_guard(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's one (a model on cuda:1, say)."""
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def program_count(device: torch.device) -> int:
    """A grid size that fills the device for kernels whose programs loop over several rows."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one after another: few, long programs are the cheapest there


def check_last_dim_contiguous(name: str, tensor: torch.Tensor) -> None:
    if tensor.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {tensor.stride()}; "
                         "call .contiguous() first.")


def check_float(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {tensor.dtype}.")
