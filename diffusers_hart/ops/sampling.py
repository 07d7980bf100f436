"""Token sampling of HART's scales: CFG mix, top-k/top-p filtering, a multinomial draw, gumbel-softmax weights.

The torch functions here are the references; `sample_tokens` and `top_k_top_p_filter` run one fused kernel per
row on CUDA. Randomness is an *input*: the caller draws `uniform` (one number per token, for the multinomial draw)
and `gumbel` (one per logit, for "more smooth") from its own generators, so a seed keeps its meaning whichever path
runs, and both paths return the same tokens for the same random tensors (up to float32 summation order: a draw or
top-p cut within about 1e-6 of its threshold may go either way).

The multinomial draw is an inverse CDF: with u ~ U[0, 1), the token is the first one whose cumulative probability
exceeds u. It has torch.multinomial's distribution, but not its random stream: a pipeline that must reproduce the
original's tokens from a CPU generator keeps calling torch.multinomial.
"""

from typing import Optional, Tuple

import torch

from .dispatch import MAX_FUSED_ROW, use_fused


def cfg_mix(logits_2BlV: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance `(1 + t) * cond - t * uncond` of stacked (cond rows, then uncond rows) logits."""
    B = logits_2BlV.shape[0] // 2
    return (1 + guidance_scale) * logits_2BlV[:B] - guidance_scale * logits_2BlV[B:]


def top_k_top_p_filter_reference(logits_BlV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit below the k-th largest of its row, then outside the top-p nucleus.

    top-k keeps every logit equal to the k-th largest (ties may keep more than k). top-p sorts ascending and drops
    the prefix whose softmax cumsum is <= 1 - p, always keeping the largest; 0 < k < V and p > 0 enable them.
    """
    logits = logits_BlV.clone()
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False  # the most likely token always stays
        logits.masked_fill_(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def inverse_cdf_sample(probs_BlV: torch.Tensor, uniform_Bl: torch.Tensor) -> torch.LongTensor:
    """One token per row: the number of cumulative probabilities <= u * total, i.e. the first one above it.

    Clamped to the last token of nonzero probability, for u * total rounding up to the total.
    """
    cdf = probs_BlV.cumsum(dim=-1)
    target = uniform_Bl.to(cdf.dtype).unsqueeze(-1) * cdf[..., -1:]
    token = (cdf <= target).sum(dim=-1)
    positions = torch.arange(probs_BlV.shape[-1], device=probs_BlV.device)
    last = torch.where(probs_BlV > 0, positions, -1).amax(dim=-1)
    return torch.minimum(token, last)


def sample_tokens_reference(
    logits_BlV: torch.Tensor,
    top_k: int,
    top_p: float,
    uniform_Bl: torch.Tensor,
    guidance_scale: Optional[float] = None,
    gumbel_BlV: Optional[torch.Tensor] = None,
    smooth_scale: float = 1.0,
    smooth_temperature: float = 1.0,
) -> Tuple[torch.LongTensor, Optional[torch.Tensor]]:
    """`sample_tokens` with torch ops: the specification of the fused kernel."""
    logits = logits_BlV.float()
    if guidance_scale is not None:
        logits = cfg_mix(logits, guidance_scale)
    filtered = top_k_top_p_filter_reference(logits, top_k, top_p)
    tokens = inverse_cdf_sample(filtered.softmax(dim=-1), uniform_Bl)
    weights = None if gumbel_BlV is None else smooth_weights(filtered, gumbel_BlV, smooth_scale, smooth_temperature)
    return tokens, weights


def smooth_weights(
    filtered_BlV: torch.Tensor, gumbel_BlV: torch.Tensor, smooth_scale: float, smooth_temperature: float
) -> torch.Tensor:
    """Gumbel-softmax weights of HART's "more smooth" token vectors: `softmax((filtered * scale + gumbel) / tau)`."""
    return ((filtered_BlV * smooth_scale + gumbel_BlV.float()) / smooth_temperature).softmax(dim=-1)


def _fusable(logits: torch.Tensor) -> bool:
    return logits.dim() == 3 and logits.numel() > 0 and logits.shape[-1] <= MAX_FUSED_ROW


def top_k_top_p_filter(logits_BlV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """`top_k_top_p_filter_reference`, fused for float32 (B, l, V) logits on CUDA.

    The fused top-p cut keeps a whole group of equal logits at the nucleus boundary, where the reference keeps the
    part of it that its (unstable) sort happens to place last; without such ties both keep the same logits.
    """
    if logits_BlV.dtype == torch.float32 and _fusable(logits_BlV) and use_fused(logits_BlV):
        from .kernels.sampling import fused_sample

        logits = logits_BlV if logits_BlV.stride(-1) == 1 else logits_BlV.contiguous()
        return fused_sample(logits, top_k, top_p, return_filtered=True)[2]
    return top_k_top_p_filter_reference(logits_BlV, top_k, top_p)


def sample_tokens(
    logits_BlV: torch.Tensor,
    top_k: int,
    top_p: float,
    uniform_Bl: torch.Tensor,
    guidance_scale: Optional[float] = None,
    gumbel_BlV: Optional[torch.Tensor] = None,
    smooth_scale: float = 1.0,
    smooth_temperature: float = 1.0,
) -> Tuple[torch.LongTensor, Optional[torch.Tensor]]:
    """Sample one token per (b, i) from logits, with optional guidance and gumbel-softmax weights.

    Args:
        logits_BlV: (B, l, V) logits, or (2B, l, V) conditional rows then unconditional ones under guidance;
            upcast to float32 first.
        top_k, top_p: filters as in `top_k_top_p_filter_reference` (0 disables either).
        uniform_Bl: (B, l) float32 uniforms in [0, 1), the randomness of the multinomial draw.
        guidance_scale: t of `(1 + t) * cond - t * uncond`; None for unguided logits.
        gumbel_BlV: (B, l, V) float32 standard gumbel noise; when given, also return
            `softmax((filtered * smooth_scale + gumbel) / smooth_temperature)`, the weights of HART's
            "more smooth" token vectors (filtered logits are -inf outside the filters, weight 0 there).

    Returns:
        tokens (B, l) int64, and the weights (B, l, V) float32 or None.
    """
    if logits_BlV.dim() != 3:
        raise ValueError(f"logits must have shape (B, l, V), got {tuple(logits_BlV.shape)}.")
    rows, n_l, V = logits_BlV.shape
    if guidance_scale is not None and rows % 2:
        raise ValueError(f"guided logits stack conditional then unconditional rows: expected an even count, got {rows}.")
    B = rows // 2 if guidance_scale is not None else rows
    if tuple(uniform_Bl.shape) != (B, n_l):
        raise ValueError(f"uniform must have shape ({B}, {n_l}), one number per sampled token; got {tuple(uniform_Bl.shape)}.")
    if gumbel_BlV is not None and tuple(gumbel_BlV.shape) != (B, n_l, V):
        raise ValueError(f"gumbel must have shape ({B}, {n_l}, {V}), got {tuple(gumbel_BlV.shape)}.")
    if _fusable(logits_BlV) and use_fused(logits_BlV, uniform_Bl, gumbel_BlV):
        from .kernels.sampling import fused_sample

        logits = logits_BlV if logits_BlV.stride(-1) == 1 else logits_BlV.contiguous()
        uniform = uniform_Bl.float()
        gumbel = None if gumbel_BlV is None else gumbel_BlV.float()
        if gumbel is not None and gumbel.stride(-1) != 1:
            gumbel = gumbel.contiguous()
        tokens, weights, _ = fused_sample(
            logits, top_k, top_p, guidance_scale, uniform, gumbel, smooth_scale, smooth_temperature
        )
        return tokens, weights
    return sample_tokens_reference(
        logits_BlV, top_k, top_p, uniform_Bl, guidance_scale, gumbel_BlV, smooth_scale, smooth_temperature
    )
