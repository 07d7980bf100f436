"""Fused token sampling: CFG mix, top-k and top-p filtering, an inverse-CDF draw, gumbel-softmax token weights.

One program per output row (b, i) holds the row's V logits in registers (V = 4096 in HART) and does, in order:

1. CFG mix `(1 + t) * cond - t * uncond` of rows b and b + B, with contraction off so both products and the
   difference round as the reference's three torch ops do (bitwise the reference's mix).
2. top-k: the k-th largest value is found exactly by a 32-step bitwise search over the row's values mapped to
   order-preserving unsigned keys (largest key T with at least k keys >= T). Values below it become -inf, ties at
   the k-th value all stay: the reference's `logits < kth` rule, exactly.
3. top-p: the reference keeps the sorted-ascending suffix whose softmax cumsum exceeds 1 - p. The kernel finds the
   same cut without sorting, by a second bitwise search for the largest key T with `sum(w[key < T]) <= (1 - p) * Z`
   (w = exp(x - max), Z = sum w) and keeps the keys >= T; the maximum always stays.
4. draw: with u in [0, 1) for the row, the token is the number of cumulative weights `cumsum(w) <= u * sum(w)`
   (the inverse CDF), clamped to the last token of nonzero weight. Distributed as torch.multinomial.
5. optional "more smooth" weights: softmax((x * smooth_scale + gumbel) / temperature) over the filtered row.
6. optional: the filtered logits themselves (`top_k_top_p_filter`).

The search on keys makes top-k exact and deterministic whatever the ties; the top-p cut and the draw compare float32
sums that the reference accumulates in another order, so the two agree except where a sum lies within float32
rounding (about 1e-6 relative) of its threshold.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import EXACT, check_float, check_last_dim_contiguous, device_guard, row_block, warps_for


@triton.jit
def _order_key(x):
    """float32 -> int64 in [0, 2**32) ordered as the floats are (negative floats get their magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return key.to(tl.int64) + 2147483648


@triton.jit
def _sample_kernel(
    LOGITS, U, GUMBEL, IDX, WEIGHTS, FILTERED,
    n_b, n_l, V,
    stride_lb, stride_ll, stride_ub, stride_ul, stride_gb, stride_gl,
    cond_scale, uncond_scale, top_k, keep_mass, smooth_scale, temperature,
    HAS_CFG: tl.constexpr, DO_TOP_K: tl.constexpr, DO_TOP_P: tl.constexpr, DO_SAMPLE: tl.constexpr,
    DO_SMOOTH: tl.constexpr, STORE_FILTERED: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_l
    i = pid % n_l
    cols = tl.arange(0, BLOCK_V)
    in_row = cols < V
    neg_inf = float("-inf")

    # 1. logits of this row, CFG-mixed
    x = tl.load(LOGITS + b * stride_lb + i * stride_ll + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_CFG:
        uncond = tl.load(LOGITS + (b + n_b) * stride_lb + i * stride_ll + cols, mask=in_row, other=0.0)
        x = cond_scale * x - uncond_scale * uncond.to(tl.float32)
    x = tl.where(in_row, x, neg_inf)

    # 2. top-k: largest key T with count(key >= T) >= k, built bit by bit from the top
    if DO_TOP_K:
        key = _order_key(x)
        kth_key = tl.zeros((), dtype=tl.int64)
        for bit in range(31, -1, -1):
            candidate = kth_key | (tl.full((), 1, tl.int64) << bit)
            count = tl.sum(tl.where(in_row & (key >= candidate), 1, 0), axis=0)
            kth_key = tl.where(count >= top_k, candidate, kth_key)
        kth_bits = (kth_key - 2147483648).to(tl.int32)
        kth = (kth_bits ^ ((kth_bits >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        x = tl.where(x >= kth, x, neg_inf)  # a float comparison, as the reference's: -0.0 and 0.0 tie

    # 3. top-p: largest key T whose strictly smaller keys hold at most (1 - p) of the mass
    if DO_TOP_P:
        row_max = tl.max(x, axis=0)
        w = tl.exp(x - row_max)  # 0 at -inf
        limit = keep_mass * tl.sum(w, axis=0)
        key = _order_key(x)
        cut_key = tl.zeros((), dtype=tl.int64)
        for bit in range(31, -1, -1):
            candidate = cut_key | (tl.full((), 1, tl.int64) << bit)
            below = tl.sum(tl.where(key < candidate, w, 0.0), axis=0)
            cut_key = tl.where(below <= limit, candidate, cut_key)
        x = tl.where((key >= cut_key) | (x == row_max), x, neg_inf)

    if STORE_FILTERED:
        tl.store(FILTERED + pid * V + cols, x, mask=in_row)

    # 4. inverse-CDF draw
    if DO_SAMPLE:
        w = tl.exp(x - tl.max(x, axis=0))
        cdf = tl.cumsum(w, axis=0)
        u = tl.load(U + b * stride_ub + i * stride_ul).to(tl.float32)
        target = u * tl.max(cdf, axis=0)  # the cumsum's own last entry, as the reference's `cdf[..., -1]`
        token = tl.sum(tl.where(in_row & (cdf <= target), 1, 0), axis=0)
        last = tl.max(tl.where(w > 0, cols, -1), axis=0)
        tl.store(IDX + pid, tl.minimum(token, last).to(tl.int64))

    # 5. gumbel-softmax weights of the "more smooth" token vectors
    if DO_SMOOTH:
        g = tl.load(GUMBEL + b * stride_gb + i * stride_gl + cols, mask=in_row, other=0.0).to(tl.float32)
        y = (x * smooth_scale + g) / temperature
        e = tl.exp(y - tl.max(y, axis=0))
        tl.store(WEIGHTS + pid * V + cols, e / tl.sum(e, axis=0), mask=in_row)


def fused_sample(
    logits: torch.Tensor,
    top_k: int,
    top_p: float,
    guidance_scale: Optional[float] = None,
    uniform: Optional[torch.Tensor] = None,
    gumbel: Optional[torch.Tensor] = None,
    smooth_scale: float = 1.0,
    smooth_temperature: float = 1.0,
    return_filtered: bool = False,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Run the fused sampler on (R, l, V) logits; R = 2B (cond rows, then uncond) under guidance, else B.

    Returns (tokens (B, l) int64 or None without `uniform`, smooth weights (B, l, V) float32 or None without
    `gumbel`, filtered float32 logits (B, l, V) or None unless `return_filtered`).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (rows, l, V), got {tuple(logits.shape)}.")
    check_float("logits", logits)
    check_last_dim_contiguous("logits", logits)
    R, n_l, V = logits.shape
    if guidance_scale is not None and R % 2:
        raise ValueError(f"under guidance the logits stack conditional and unconditional rows: got {R} rows.")
    B = R // 2 if guidance_scale is not None else R
    for name, t, shape in (("uniform", uniform, (B, n_l)), ("gumbel", gumbel, (B, n_l, V))):
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}.")
        if t.dtype != torch.float32 or t.device != logits.device:
            raise ValueError(f"{name} must be float32 on {logits.device}, got {t.dtype} on {t.device}.")
    if gumbel is not None:
        check_last_dim_contiguous("gumbel", gumbel)
    if not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}.")

    device = logits.device
    block = row_block(V, "logits")
    idx = torch.empty((B, n_l), dtype=torch.int64, device=device) if uniform is not None else None
    weights = torch.empty((B, n_l, V), dtype=torch.float32, device=device) if gumbel is not None else None
    filtered = torch.empty((B, n_l, V), dtype=torch.float32, device=device) if return_filtered else None
    if B * n_l == 0:
        return idx, weights, filtered
    t = 0.0 if guidance_scale is None else float(guidance_scale)
    dummy = logits  # pointer for the outputs/inputs a constexpr switch leaves unused
    with device_guard(logits):
        _sample_kernel[(B * n_l,)](
            logits, uniform if uniform is not None else dummy, gumbel if gumbel is not None else dummy,
            idx if idx is not None else dummy, weights if weights is not None else dummy,
            filtered if filtered is not None else dummy,
            B, n_l, V, logits.stride(0), logits.stride(1),
            uniform.stride(0) if uniform is not None else 0, uniform.stride(1) if uniform is not None else 0,
            gumbel.stride(0) if gumbel is not None else 0, gumbel.stride(1) if gumbel is not None else 0,
            # python floats reach the kernel as float32, as torch casts a scalar operand of a float32 tensor
            1.0 + t, t, int(top_k), 1.0 - float(top_p), float(smooth_scale), float(smooth_temperature),
            HAS_CFG=guidance_scale is not None, DO_TOP_K=0 < top_k < V, DO_TOP_P=top_p > 0,
            DO_SAMPLE=uniform is not None, DO_SMOOTH=gumbel is not None, STORE_FILTERED=return_filtered,
            BLOCK_V=block, num_warps=warps_for(block), **EXACT,
        )  # fmt: skip
    return idx, weights, filtered
