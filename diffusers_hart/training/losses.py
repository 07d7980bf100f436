"""One training step of the HART transformer: token logits, sampled last-scale tokens and the residual-diffusion loss.

The step follows the original `HARTForT2I.forward`:

1. Classifier-free-guidance dropout: whole context rows are zeroed (their attention mask is left as is).
2. MaskGIT-style thinning of the last scale: a random subset of its tokens is removed from the sequence, the rest is
   teacher-forced together with every earlier scale through the block-causal transformer.
3. Last-scale tokens are sampled from the model's own (top-k 600 / top-p 0.96 filtered) logits. Their code vectors
   condition the diffusion head, whose target is the continuous residual left after subtracting those code vectors
   from the ground-truth residual of the last scale.
4. The diffusion head is trained with the improved-DDPM loss (epsilon MSE + variational bound) on
   `diffusion_batch_mul` noised copies of every kept token.

Every random choice can be passed in (to replay recorded draws) or drawn from a `torch.Generator`.
"""

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..pipelines.hart.sampling import top_k_top_p_filter

# Fixed in the original's training step.
TRAINING_TOP_K = 600
TRAINING_TOP_P = 0.96
# MAR-style mask ratio: a normal around 1.0 (std 0.25) truncated to [0.5, 1.0].
MASK_RATIO_MIN, MASK_RATIO_MEAN, MASK_RATIO_STD = 0.5, 1.0, 0.25
# At least this many last-scale tokens are always kept.
MIN_KEPT_LAST_SCALE_TOKENS = 32


@dataclass
class HARTTrainingDraws:
    """The random choices of one training step.

    Args:
        last_scale_keep (`torch.BoolTensor` of shape `(B, pn_last**2)`): Last-scale tokens kept in the sequence;
            every row keeps the same number.
        cond_dropped (`torch.BoolTensor` of shape `(B,)`): Rows whose context is zeroed (unconditional training).
        diffusion_timesteps (`torch.LongTensor` of shape `(N,)`): Diffusion timesteps in `[0, num_train_timesteps)`,
            `N = diffusion_batch_mul * B * kept`.
        diffusion_noise (`torch.Tensor` of shape `(N, latent_channels)`): Standard normal noise of the diffusion loss.
    """

    last_scale_keep: torch.Tensor
    cond_dropped: torch.Tensor
    diffusion_timesteps: torch.Tensor
    diffusion_noise: torch.Tensor


@dataclass
class HARTTrainingOutput:
    """
    Args:
        logits (`torch.Tensor` of shape `(B, 1 + sum(pn**2 for pn in patch_nums[1:-1]) + kept, vocab_size)`):
            Token logits from the last context position on (the original's return value): row 0 predicts the first
            scale, then every input token predicts its own scale's token at the same place.
        sampled_indices (`torch.LongTensor` of shape `(B, kept)`): Last-scale tokens sampled from the logits.
        diffusion_loss_per_sample (`torch.Tensor` of shape `(N,)`): Loss of every noised residual token.
        diffusion_loss (`torch.Tensor` of shape `()`): Its mean.
        draws (`HARTTrainingDraws`): The random choices used (given or drawn).
        used_fallback_indices (`bool`): True when the logits were not finite and `fallback_indices` stood in for
            `sampled_indices` (see `hart_training_outputs`).
    """

    logits: torch.Tensor
    sampled_indices: torch.Tensor
    diffusion_loss_per_sample: torch.Tensor
    diffusion_loss: torch.Tensor
    draws: HARTTrainingDraws
    used_fallback_indices: bool = False


def last_scale_keep_from_orders(
    orders: torch.Tensor, mask_ratio: float, min_kept: int = MIN_KEPT_LAST_SCALE_TOKENS
) -> torch.Tensor:
    """Keep mask of the last scale: each row masks the first `min(ceil(l * mask_ratio), l - min_kept)` entries of
    its permutation `orders[b]` of `range(l)`. Returns a (B, l) bool tensor, True on kept tokens."""
    B, num_tokens = orders.shape
    num_masked = min(math.ceil(num_tokens * float(mask_ratio)), num_tokens - min_kept)
    keep = torch.ones(B, num_tokens, dtype=torch.bool, device=orders.device)
    return keep.scatter(1, orders[:, : max(num_masked, 0)].long(), False)


def sample_mask_ratio(generator: Optional[torch.Generator] = None) -> float:
    """A normal(1.0, 0.25) draw truncated to [0.5, 1.0], by inverse-CDF sampling in float64 (the original uses
    scipy's truncnorm on numpy's global RNG; this draws the same distribution from a torch generator)."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    lo = normal.cdf(torch.tensor((MASK_RATIO_MIN - MASK_RATIO_MEAN) / MASK_RATIO_STD, dtype=torch.float64))
    hi = normal.cdf(torch.tensor(0.0, dtype=torch.float64))  # the upper bound is the mean itself
    u = torch.rand((), generator=generator, dtype=torch.float64)
    return (MASK_RATIO_MEAN + MASK_RATIO_STD * normal.icdf(lo + u * (hi - lo))).clamp(MASK_RATIO_MIN, 1.0).item()


def sample_last_scale_keep(
    batch_size: int,
    num_tokens: int,
    generator: Optional[torch.Generator] = None,
    device=None,
    min_kept: int = MIN_KEPT_LAST_SCALE_TOKENS,
) -> torch.Tensor:
    """Draw which last-scale tokens stay in the sequence: one random permutation per row, then one mask ratio for
    the whole batch (`sample_mask_ratio`), combined by `last_scale_keep_from_orders`. Returns (B, num_tokens) bool.

    With the original's 0.5 lower bound and 32 kept tokens, a 64-token last scale always masks exactly 32.
    """
    if num_tokens <= min_kept:
        raise ValueError(f"the last scale has {num_tokens} tokens; at least {min_kept + 1} are needed to mask any")
    orders = torch.stack([torch.randperm(num_tokens, generator=generator) for _ in range(batch_size)])
    keep = last_scale_keep_from_orders(orders, sample_mask_ratio(generator), min_kept)
    return keep.to(device)


def sample_cond_drop(
    batch_size: int, cond_drop_rate: float, generator: Optional[torch.Generator] = None, device=None
) -> torch.Tensor:
    """Rows whose context is dropped, reproducing the original's `randn(B) < cond_drop_rate`.

    Quirk kept on purpose: the threshold is compared with a *standard normal* draw, not a uniform one, so a row is
    dropped with probability Phi(cond_drop_rate) (about 0.54 for the usual 0.1), not `cond_drop_rate`. Released
    checkpoints were trained that way; pass `cond_dropped` explicitly for a different rate.
    """
    return (torch.randn(batch_size, generator=generator, dtype=torch.float32) < cond_drop_rate).to(device)


def sample_last_scale_tokens(
    logits_BlV: torch.Tensor,
    generator: Optional[torch.Generator],
    top_k: int = TRAINING_TOP_K,
    top_p: float = TRAINING_TOP_P,
) -> torch.LongTensor:
    """One token per row of (B, l, V) logits after top-k / top-p filtering (the caller's logits are not changed)."""
    B, l, V = logits_BlV.shape
    probs = top_k_top_p_filter(logits_BlV.detach().float(), top_k, top_p).softmax(dim=-1)
    on = generator.device if generator is not None else probs.device
    idx = torch.multinomial(probs.to(on).view(-1, V), 1, replacement=True, generator=generator)
    return idx.view(B, l).to(logits_BlV.device)


def hart_training_outputs(
    transformer,
    scheduler,
    codebook: torch.Tensor,
    context: torch.Tensor,
    context_mask: torch.Tensor,
    context_position_ids: torch.Tensor,
    teacher_forcing_input: torch.Tensor,
    last_scale_target: torch.Tensor,
    fallback_indices: Optional[torch.Tensor] = None,
    last_scale_keep: Optional[torch.Tensor] = None,
    cond_dropped: Optional[torch.Tensor] = None,
    diffusion_timesteps: Optional[torch.Tensor] = None,
    diffusion_noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    sampling_generator: Optional[torch.Generator] = None,
    mask_generator: Optional[torch.Generator] = None,
) -> HARTTrainingOutput:
    """
    Run one HART training forward and its diffusion loss. No input tensor is modified.

    Args:
        transformer (`HARTTransformer2DModel`): The model being trained (its mode, train/eval, is left as is).
        scheduler (`HARTResidualDiffusionScheduler`): Provides the 1000-step training diffusion and its loss.
        codebook (`torch.Tensor` of shape `(vocab_size, latent_channels)`): The tokenizer's codebook
            (`vae.quantize.embedding.weight`); it receives no gradient here.
        context (`torch.Tensor` of shape `(B, context_length, context_dim)`): Text-encoder hidden states.
        context_mask (`torch.BoolTensor` of shape `(B, context_length)`): True on real (non-pad) text tokens.
        context_position_ids (`torch.LongTensor` of shape `(B, context_length)`): Text RoPE positions.
        teacher_forcing_input (`torch.Tensor` of shape `(B, sum(pn**2 for pn in patch_nums[1:]), latent_channels)`):
            `vae.quantize.teacher_forcing_input(indices)`.
        last_scale_target (`torch.Tensor` of shape `(B, pn_last**2, latent_channels)`): The latent residual left
            before the last discrete scale (`latent_to_indices(...)[1]`).
        fallback_indices (`torch.LongTensor` of shape `(B, pn_last**2)`, *optional*): Ground-truth last-scale
            indices. The original swaps them in for the sampled tokens whenever sampling raises (it wraps the draw in
            a bare `except`). Here sampling can only fail on non-finite logits, which is checked explicitly: then
            these indices (at the kept positions) are used with a warning and `used_fallback_indices=True`; without
            them a `FloatingPointError` is raised. Any other error propagates.
        last_scale_keep, cond_dropped, diffusion_timesteps, diffusion_noise (*optional*):
            The random choices (see `HARTTrainingDraws`). Each one not given is drawn, in this order: keep mask
            (from `mask_generator`), cond drop, timesteps, noise (from `generator`).
        generator (`torch.Generator`, *optional*): Source of the draws not given (CPU generator). With the keep
            mask given or drawn from a separate `mask_generator`, its stream matches the original's global torch
            RNG: a generator seeded like the original's `torch.manual_seed` reproduces its cond drop, timesteps
            and noise.
        sampling_generator (`torch.Generator`, *optional*): Source of the last-scale token sampling (the original's
            `model.rng`); defaults to `generator`.
        mask_generator (`torch.Generator`, *optional*): Source of the keep mask (the original uses numpy and
            scipy for it); defaults to `generator`.
    """
    config = transformer.config
    B, num_last, channels = last_scale_target.shape
    if sampling_generator is None:
        sampling_generator = generator
    if mask_generator is None:
        mask_generator = generator

    # 1. random choices of the sequence
    if last_scale_keep is None:
        last_scale_keep = sample_last_scale_keep(B, num_last, mask_generator, device=context.device)
    last_scale_keep = last_scale_keep.to(device=context.device, dtype=torch.bool)
    kept_per_row = last_scale_keep.sum(dim=1)
    if (kept_per_row != kept_per_row[0]).any():
        raise ValueError(f"every row must keep the same number of last-scale tokens, got {kept_per_row.tolist()}")
    num_kept = int(kept_per_row[0])
    if num_kept == 0:
        raise ValueError("last_scale_keep keeps no token; the diffusion loss needs at least one per row")
    if cond_dropped is None:
        cond_dropped = sample_cond_drop(B, config.cond_drop_rate, generator, device=context.device)
    cond_dropped = cond_dropped.to(device=context.device, dtype=torch.bool)

    # 2. transformer forward; the original zeroes dropped rows of the caller's context in place, this builds a copy
    row_scale = (~cond_dropped).to(context.dtype).view(B, 1, 1)
    out = transformer(
        encoder_hidden_states=context * row_scale,
        encoder_attention_mask=context_mask,
        encoder_position_ids=context_position_ids,
        latent_tokens=teacher_forcing_input,
        last_scale_keep=last_scale_keep,
    )
    logits = out.logits[:, config.context_length - 1 :]
    last_logits = out.logits[:, -num_kept:]
    last_hidden = out.hidden_states[:, -num_kept:]

    # 3. last-scale tokens from the model's own prediction
    used_fallback = False
    with torch.no_grad():
        if torch.isfinite(last_logits).all():
            sampled = sample_last_scale_tokens(last_logits, sampling_generator)
        elif fallback_indices is not None:
            warnings.warn(
                "non-finite last-scale logits: using the ground-truth indices to condition the diffusion head",
                stacklevel=2,
            )
            sampled = fallback_indices.to(last_logits.device)[last_scale_keep].view(B, num_kept)
            used_fallback = True
        else:
            raise FloatingPointError("non-finite last-scale logits; pass fallback_indices to train through them")

    # 4. diffusion loss on the residual the sampled tokens leave
    code_vectors = F.embedding(sampled, codebook.detach())
    condition = transformer.residual_condition(last_hidden, code_vectors.to(last_hidden.dtype))
    residual = last_scale_target[last_scale_keep].view(B, num_kept, channels) - code_vectors.to(last_scale_target.dtype)
    repeats = config.diffusion_batch_mul
    x_start = (residual.reshape(B * num_kept, channels) / config.residual_scale).repeat(repeats, 1)
    condition = condition.reshape(B * num_kept, -1).repeat(repeats, 1)
    num_rows = x_start.shape[0]
    if diffusion_timesteps is None:
        diffusion_timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (num_rows,), generator=generator)
    diffusion_timesteps = diffusion_timesteps.to(x_start.device)
    if diffusion_noise is None:
        diffusion_noise = torch.randn(x_start.shape, generator=generator, dtype=x_start.dtype)
    diffusion_noise = diffusion_noise.to(device=x_start.device, dtype=x_start.dtype)
    if diffusion_timesteps.shape != (num_rows,) or diffusion_noise.shape != x_start.shape:
        raise ValueError(
            f"expected {num_rows} timesteps and noise of shape {tuple(x_start.shape)}, got "
            f"{tuple(diffusion_timesteps.shape)} and {tuple(diffusion_noise.shape)}"
        )
    noisy = scheduler.add_noise(x_start, diffusion_noise, diffusion_timesteps)
    model_output = transformer.diffusion_head(noisy, diffusion_timesteps, condition)
    per_sample = scheduler.training_losses(model_output, x_start, diffusion_noise, diffusion_timesteps)

    draws = HARTTrainingDraws(last_scale_keep, cond_dropped, diffusion_timesteps, diffusion_noise)
    return HARTTrainingOutput(logits, sampled, per_sample, per_sample.mean(), draws, used_fallback)


def token_targets(scale_indices: Sequence[torch.Tensor], last_scale_keep: torch.Tensor) -> torch.LongTensor:
    """Targets aligned with `HARTTrainingOutput.logits`: every scale's indices, the last one at the kept positions.

    Args:
        scale_indices (`Sequence[torch.LongTensor]`): (B, pn**2) ground-truth indices of every scale.
        last_scale_keep (`torch.BoolTensor`): The keep mask of the step.
    """
    B = last_scale_keep.shape[0]
    last = scale_indices[-1][last_scale_keep.bool()].view(B, -1)
    return torch.cat([*scale_indices[:-1], last], dim=1)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean next-scale token cross-entropy over every position (the released code ships no training loop; this is
    the plain VAR-style loss)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), label_smoothing=label_smoothing
    )
