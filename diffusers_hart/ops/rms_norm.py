import torch


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, cast back, then scaled by `weight`.

    The cast happens *before* the weight multiply, as in the original's fused CUDA kernel,
    so low-precision outputs round exactly where the original's do.
    """
    x_f32 = hidden_states.float()
    normed = x_f32 * torch.rsqrt(x_f32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return normed.to(hidden_states.dtype) * weight.to(hidden_states.dtype)
