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

`hart_training_step` is that step without a single read of the device from the host (no `.item()`, no
data-dependent shapes, no host-side checks): the training module (`transformer_step.py`) runs it.
`hart_training_outputs` is the reference entry point around it: it validates its inputs and reports non-finite logits
on the host, and replays recorded draws (tests/test_training_golden.py).
"""

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..pipelines.hart.sampling import GeneratorArg, top_k_top_p_filter

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
        sampled_indices (`torch.LongTensor` of shape `(B, kept)`): Last-scale tokens that condition the diffusion head.
        diffusion_loss_per_sample (`torch.Tensor` of shape `(N,)`): Loss of every noised residual token.
        diffusion_loss (`torch.Tensor` of shape `()`): Its mean.
        draws (`HARTTrainingDraws`): The random choices used (given or drawn).
        used_fallback_indices (`bool` or `torch.BoolTensor` of shape `()`): True when the sampling probabilities were
            not finite and the ground-truth indices stood in for the sampled ones. `hart_training_step` leaves it on
            the device (reading it would sync); `hart_training_outputs` returns a `bool`.
    """

    logits: torch.Tensor
    sampled_indices: torch.Tensor
    diffusion_loss_per_sample: torch.Tensor
    diffusion_loss: torch.Tensor
    draws: HARTTrainingDraws
    used_fallback_indices: Union[bool, torch.Tensor] = False


class TrainingRandomness:
    """
    Where the random draws of a training step come from, on the device of the step.

    * One `torch.Generator` draws every quantity for the whole batch at once, in the original's layout and order, so
      a generator seeded like the original's global torch RNG replays its draws.
    * A list holds one generator per sample, and each sample's draws come from its own generator alone: a sample
      draws the same numbers whatever else is in its batch, so a batch split over processes draws what it draws whole.
    * `None` draws from the default generator of `device`.

    Draws are made on the generator's device and moved to `device` (free when the two are the same).

    Args:
        generator (`torch.Generator` or `List[torch.Generator]`, *optional*): The source of the draws.
        batch_size (`int`): Samples in the batch (the length of a generator list).
        device (`torch.device`): Where the draws are used.
    """

    def __init__(self, generator: GeneratorArg, batch_size: int, device):
        self.per_sample = isinstance(generator, (list, tuple))
        if self.per_sample and len(generator) != batch_size:
            raise ValueError(
                f"You passed a list of {len(generator)} generators for a batch of {batch_size} samples; pass one "
                "generator per sample or a single generator."
            )
        self.generator = generator
        self.batch_size = batch_size
        self.device = torch.device(device)

    def _draw(self, draw: Callable, per_sample_shape: Tuple[int, ...], batch_dim: int) -> torch.Tensor:
        """`draw(shape, generator, device)` for the batch: one call with the batch inserted at `batch_dim` of
        `per_sample_shape`, or one call per sample generator stacked along `batch_dim`."""
        if self.per_sample:
            draws = [draw(per_sample_shape, g, g.device).to(self.device) for g in self.generator]
            return torch.stack(draws, dim=batch_dim)
        shape = (*per_sample_shape[:batch_dim], self.batch_size, *per_sample_shape[batch_dim:])
        on = self.device if self.generator is None else self.generator.device
        return draw(shape, self.generator, on).to(self.device)

    def permutations(self, num_tokens: int) -> torch.LongTensor:
        """(B, num_tokens): a random permutation of `range(num_tokens)` per row.

        One generator sorts one (B, num_tokens) draw of random keys row by row: one draw and one sort for the batch.
        (A `randperm` per row costs a handful of kernel launches and a sort each, which bounded the training step on
        a GPU: `benchmarks/training/profile_transformer_step.py`.) Per-sample generators draw a `randperm` each.
        """
        if self.per_sample:
            rows = [torch.randperm(num_tokens, generator=g, device=g.device) for g in self.generator]
            return torch.stack(rows).to(self.device)
        # float64 keys: a tie, which would favour one order of the tied tokens, is as good as impossible
        return self._draw(
            lambda shape, g, on: torch.rand(shape, generator=g, device=on, dtype=torch.float64), (num_tokens,), 0
        ).argsort(dim=1)

    def standard_normal(self) -> torch.Tensor:
        """(B,) standard normal draws, one per sample."""
        return self._draw(lambda shape, g, on: torch.randn(shape, generator=g, device=on), (), 0)

    def uniform(self) -> torch.Tensor:
        """(B,) uniform draws in [0, 1), one per sample."""
        return self._draw(lambda shape, g, on: torch.rand(shape, generator=g, device=on), (), 0)

    def exponential(self, num_tokens: int, vocab_size: int) -> torch.Tensor:
        """(B, num_tokens, vocab_size) float32 Exp(1) draws: the randomness of one categorical draw per token."""
        return self._draw(
            lambda shape, g, on: torch.empty(shape, device=on, dtype=torch.float32).exponential_(generator=g),
            (num_tokens, vocab_size),
            0,
        )

    def timesteps(self, copies: int, num_tokens: int, num_train_timesteps: int) -> torch.LongTensor:
        """(copies * B * num_tokens,) uniform timesteps, ordered (copy, sample, token) as the diffusion rows are."""
        steps = self._draw(
            lambda shape, g, on: torch.randint(0, num_train_timesteps, shape, generator=g, device=on),
            (copies, num_tokens),
            1,
        )
        return steps.reshape(-1)

    def noise(self, copies: int, num_tokens: int, channels: int, dtype: torch.dtype) -> torch.Tensor:
        """(copies * B * num_tokens, channels) standard normal noise, rows ordered as `timesteps`."""
        noise = self._draw(
            lambda shape, g, on: torch.randn(shape, generator=g, device=on, dtype=dtype),
            (copies, num_tokens, channels),
            1,
        )
        return noise.reshape(-1, channels)


def num_masked_last_scale(num_tokens: int, mask_ratio: float, min_kept: int = MIN_KEPT_LAST_SCALE_TOKENS) -> int:
    """How many of the last scale's `num_tokens` tokens a mask ratio drops: `ceil(num_tokens * mask_ratio)`, but
    `min_kept` always stay."""
    return max(min(math.ceil(num_tokens * float(mask_ratio)), num_tokens - min_kept), 0)


def last_scale_keep_from_orders(
    orders: torch.Tensor, mask_ratio: float, min_kept: int = MIN_KEPT_LAST_SCALE_TOKENS
) -> torch.Tensor:
    """Keep mask of the last scale: each row masks the first `num_masked_last_scale(l, mask_ratio, min_kept)` entries
    of its permutation `orders[b]` of `range(l)`. Returns a (B, l) bool tensor, True on kept tokens."""
    B, num_tokens = orders.shape
    num_masked = num_masked_last_scale(num_tokens, mask_ratio, min_kept)
    keep = torch.ones(B, num_tokens, dtype=torch.bool, device=orders.device)
    return keep.scatter(1, orders[:, :num_masked].long(), False)


def kept_positions_from_orders(
    orders: torch.Tensor, mask_ratio: float, min_kept: int = MIN_KEPT_LAST_SCALE_TOKENS
) -> torch.LongTensor:
    """The kept positions of `last_scale_keep_from_orders`'s mask, ascending in every row: (B, kept) long.

    Built from the host-side count, so nothing is read off the device (the mask would need its count read back)."""
    num_masked = num_masked_last_scale(orders.shape[1], mask_ratio, min_kept)
    return orders[:, num_masked:].long().sort(dim=1).values


def sample_mask_ratio(generator: Optional[torch.Generator] = None) -> float:
    """A normal(1.0, 0.25) draw truncated to [0.5, 1.0], by inverse-CDF sampling in float64 (the original uses
    scipy's truncnorm on numpy's global RNG; this draws the same distribution from a torch generator).

    A host draw: `generator` is a CPU generator, `None` torch's default one. The ratio sets the sequence length, so
    it must be known on the host without reading the device."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    lo = normal.cdf(torch.tensor((MASK_RATIO_MIN - MASK_RATIO_MEAN) / MASK_RATIO_STD, dtype=torch.float64))
    hi = normal.cdf(torch.tensor(0.0, dtype=torch.float64))  # the upper bound is the mean itself
    u = torch.rand((), generator=generator, dtype=torch.float64)
    return (MASK_RATIO_MEAN + MASK_RATIO_STD * normal.icdf(lo + u * (hi - lo))).clamp(MASK_RATIO_MIN, 1.0).item()


def check_last_scale_size(num_tokens: int, min_kept: int = MIN_KEPT_LAST_SCALE_TOKENS) -> None:
    if num_tokens <= min_kept:
        raise ValueError(
            f"the last scale has {num_tokens} tokens; at least {min_kept + 1} are needed to mask any (the step always "
            f"keeps {min_kept}): use a larger last patch_num"
        )


def sample_last_scale_keep(
    batch_size: int,
    num_tokens: int,
    generator: Optional[torch.Generator] = None,
    device=None,
    min_kept: int = MIN_KEPT_LAST_SCALE_TOKENS,
) -> torch.Tensor:
    """Draw which last-scale tokens stay in the sequence: one random permutation per row, then one mask ratio for
    the whole batch (`sample_mask_ratio`), combined by `last_scale_keep_from_orders`. Returns (B, num_tokens) bool.

    `generator` is a CPU generator (or `None`: torch's default one). With the original's 0.5 lower bound and 32 kept
    tokens, a 64-token last scale always masks exactly 32.
    """
    check_last_scale_size(num_tokens, min_kept)
    orders = TrainingRandomness(generator, batch_size, "cpu").permutations(num_tokens)
    keep = last_scale_keep_from_orders(orders, sample_mask_ratio(generator), min_kept)
    return keep.to(device)


def sample_cond_drop(
    batch_size: int, cond_drop_rate: float, generator: GeneratorArg = None, device="cpu", original: bool = True
) -> torch.Tensor:
    """Rows whose context is dropped: each with probability `cond_drop_rate`, or (`original=True`, the default here,
    which the golden replay needs) as the original draws them, `randn(B) < cond_drop_rate`.

    The original compares the rate with a *standard normal* draw, not a uniform one, so it drops a row with probability
    Phi(cond_drop_rate), about 0.54 for the usual 0.1: half of its training steps see no text. Released checkpoints
    were trained that way; the trainer draws the stated rate unless asked for the original's (a divergence the README
    lists).
    """
    randomness = TrainingRandomness(generator, batch_size, device)
    if original:
        return randomness.standard_normal() < cond_drop_rate
    return randomness.uniform() < cond_drop_rate


def sample_last_scale_tokens(
    logits_BlV: torch.Tensor,
    exponential_BlV: torch.Tensor,
    top_k: int = TRAINING_TOP_K,
    top_p: float = TRAINING_TOP_P,
) -> Tuple[torch.LongTensor, torch.Tensor]:
    """One token per row of (B, l, V) logits after top-k / top-p filtering, by the exponential race.

    `argmax(p / E)` with `E ~ Exp(1)` i.i.d. (`exponential_BlV`, `TrainingRandomness.exponential`) is a draw from `p`.
    It is what `torch.multinomial(p, 1)` computes from the same numbers, so a generator replays the original's draws bit
    for bit, but without multinomial's host-side check of `p`, which syncs with the device.

    Returns:
        `(tokens, drawable)`: the (B, l) tokens, and a `()` bool tensor, False when the probabilities are not finite (a
        draw the original's `torch.multinomial` would have refused; the tokens are then meaningless).
    """
    probs = top_k_top_p_filter(logits_BlV.detach().float(), top_k, top_p).softmax(dim=-1)
    return (probs / exponential_BlV.to(probs.device)).argmax(dim=-1), torch.isfinite(probs).all()


def hart_training_step(
    transformer,
    scheduler,
    codebook: torch.Tensor,
    context: torch.Tensor,
    context_mask: torch.Tensor,
    context_position_ids: torch.Tensor,
    teacher_forcing_input: torch.Tensor,
    last_scale_target: torch.Tensor,
    last_scale_kept_positions: torch.LongTensor,
    cond_dropped: torch.Tensor,
    randomness: TrainingRandomness,
    sampling_randomness: Optional[TrainingRandomness] = None,
    last_scale_indices: Optional[torch.LongTensor] = None,
    diffusion_timesteps: Optional[torch.Tensor] = None,
    diffusion_noise: Optional[torch.Tensor] = None,
) -> HARTTrainingOutput:
    """
    One HART training forward and its diffusion loss, with no host read of the device. No input tensor is modified.

    Every shape is known on the host (the number of kept tokens is `last_scale_kept_positions.shape[1]`), tokens are
    gathered rather than picked by boolean masks, and non-finite sampling probabilities are handled on the device (see
    `last_scale_indices`) instead of by a host-side check.

    Args:
        transformer (`HARTTransformer2DModel`): The model being trained (its mode, train/eval, is left as is).
        scheduler (`HARTResidualDiffusionScheduler`): Provides the 1000-step training diffusion and its loss.
        codebook (`torch.Tensor` of shape `(vocab_size, latent_channels)`): The tokenizer's code vectors; they receive
            no gradient here.
        context (`torch.Tensor` of shape `(B, context_length, context_dim)`): Text-encoder hidden states.
        context_mask (`torch.BoolTensor` of shape `(B, context_length)`): True on real (non-pad) text tokens.
        context_position_ids (`torch.LongTensor` of shape `(B, context_length)`): Text RoPE positions.
        teacher_forcing_input (`torch.Tensor` of shape `(B, sum(pn**2 for pn in patch_nums[1:]), latent_channels)`):
            `vae.teacher_forcing_input(indices)`.
        last_scale_target (`torch.Tensor` of shape `(B, pn_last**2, latent_channels)`): The latent residual left
            before the last discrete scale (`vae.latent_to_indices(...)[1]`).
        last_scale_kept_positions (`torch.LongTensor` of shape `(B, kept)`): Last-scale tokens kept in the sequence,
            ascending in every row (`kept_positions_from_orders`).
        cond_dropped (`torch.BoolTensor` of shape `(B,)`): Rows whose context is zeroed.
        randomness (`TrainingRandomness`): Source of the diffusion timesteps and noise not given.
        sampling_randomness (`TrainingRandomness`, *optional*): Source of the last-scale token sampling; defaults to
            `randomness` (drawn before the timesteps and noise).
        last_scale_indices (`torch.LongTensor` of shape `(B, kept)`, *optional*): Ground-truth last-scale indices at
            the kept positions. The original samples in a bare `try` and conditions the diffusion head on the ground
            truth when the draw fails, which only non-finite probabilities make it do. Here the sampling probabilities
            of the whole batch are checked on the device and, if any is not finite, these indices stand in for every
            sampled token (`torch.where`, no sync); the losses are then not finite either, and show it. Without them
            the sampled tokens are used as they come.
        diffusion_timesteps (`torch.LongTensor` of shape `(N,)`, *optional*), diffusion_noise (`torch.Tensor` of shape
            `(N, latent_channels)`, *optional*): Draws to replay, `N = diffusion_batch_mul * B * kept`.
    """
    config = transformer.config
    B, num_kept = last_scale_kept_positions.shape
    channels = last_scale_target.shape[-1]
    sampling_randomness = sampling_randomness or randomness

    # 1. transformer forward; the original zeroes dropped rows of the caller's context in place, this builds a copy
    row_scale = (~cond_dropped).to(context.dtype).view(B, 1, 1)
    out = transformer(
        encoder_hidden_states=context * row_scale,
        encoder_attention_mask=context_mask,
        encoder_position_ids=context_position_ids,
        latent_tokens=teacher_forcing_input,
        last_scale_keep=last_scale_kept_positions,
    )
    logits = out.logits[:, config.context_length - 1 :]
    last_logits = out.logits[:, -num_kept:]
    last_hidden = out.hidden_states[:, -num_kept:]

    # 2. last-scale tokens from the model's own prediction
    with torch.no_grad():
        exponential = sampling_randomness.exponential(num_kept, last_logits.shape[-1])
        sampled, drawable = sample_last_scale_tokens(last_logits, exponential)
        used_fallback = ~drawable
        if last_scale_indices is not None:
            sampled = torch.where(used_fallback, last_scale_indices.to(sampled.device), sampled)

    # 3. diffusion loss on the residual the sampled tokens leave
    code_vectors = F.embedding(sampled, codebook.detach())
    condition = transformer.residual_condition(last_hidden, code_vectors.to(last_hidden.dtype))
    kept_index = last_scale_kept_positions.to(last_scale_target.device).unsqueeze(-1).expand(B, num_kept, channels)
    residual = last_scale_target.gather(1, kept_index) - code_vectors.to(last_scale_target.dtype)
    copies = config.diffusion_batch_mul
    x_start = (residual.reshape(B * num_kept, channels) / config.residual_scale).repeat(copies, 1)
    condition = condition.reshape(B * num_kept, -1).repeat(copies, 1)
    num_rows = x_start.shape[0]
    if diffusion_timesteps is None:
        diffusion_timesteps = randomness.timesteps(copies, num_kept, scheduler.config.num_train_timesteps)
    diffusion_timesteps = diffusion_timesteps.to(x_start.device)
    if diffusion_noise is None:
        diffusion_noise = randomness.noise(copies, num_kept, channels, x_start.dtype)
    diffusion_noise = diffusion_noise.to(device=x_start.device, dtype=x_start.dtype)
    if diffusion_timesteps.shape != (num_rows,) or diffusion_noise.shape != x_start.shape:
        raise ValueError(
            f"expected {num_rows} timesteps and noise of shape {tuple(x_start.shape)}, got "
            f"{tuple(diffusion_timesteps.shape)} and {tuple(diffusion_noise.shape)}"
        )
    noisy = scheduler.add_noise(x_start, diffusion_noise, diffusion_timesteps)
    model_output = transformer.diffusion_head(noisy, diffusion_timesteps, condition)
    per_sample = scheduler.training_losses(model_output, x_start, diffusion_noise, diffusion_timesteps)

    keep = torch.zeros(B, last_scale_target.shape[1], dtype=torch.bool, device=last_scale_target.device)
    keep = keep.scatter(1, kept_index[..., 0], True)
    draws = HARTTrainingDraws(keep, cond_dropped, diffusion_timesteps, diffusion_noise)
    return HARTTrainingOutput(logits, sampled, per_sample, per_sample.mean(), draws, used_fallback)


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
    Run one HART training forward and its diffusion loss, as `hart_training_step`, checking on the host what that
    one cannot: that every row keeps the same number of tokens, and whether the sampling fell back to the ground truth.
    The reference entry point (parity with the original, replay of recorded draws); training runs
    `HARTTransformerTrainingModule`, which never reads the device. No input tensor is modified.

    Args:
        transformer (`HARTTransformer2DModel`), scheduler (`HARTResidualDiffusionScheduler`), codebook, context,
            context_mask, context_position_ids, teacher_forcing_input, last_scale_target: As in `hart_training_step`.
        fallback_indices (`torch.LongTensor` of shape `(B, pn_last**2)`, *optional*): Ground-truth last-scale
            indices. The original swaps them in for the sampled tokens whenever sampling raises (it wraps the draw in
            a bare `except`), which non-finite probabilities make it do. Then these indices (at the kept positions)
            are used with a warning and `used_fallback_indices=True`; without them a `FloatingPointError` is raised.
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
    B, num_last, _ = last_scale_target.shape
    device = context.device
    if sampling_generator is None:
        sampling_generator = generator
    if mask_generator is None:
        mask_generator = generator

    # 1. random choices of the sequence, checked on the host
    if last_scale_keep is None:
        last_scale_keep = sample_last_scale_keep(B, num_last, mask_generator, device=device)
    last_scale_keep = last_scale_keep.to(device=device, dtype=torch.bool)
    kept_per_row = last_scale_keep.sum(dim=1)
    if (kept_per_row != kept_per_row[0]).any():
        raise ValueError(f"every row must keep the same number of last-scale tokens, got {kept_per_row.tolist()}")
    if int(kept_per_row[0]) == 0:
        raise ValueError("last_scale_keep keeps no token; the diffusion loss needs at least one per row")
    kept_positions = last_scale_keep.nonzero()[:, 1].view(B, -1)
    if cond_dropped is None:
        cond_dropped = sample_cond_drop(B, transformer.config.cond_drop_rate, generator, device=device)
    ground_truth = None if fallback_indices is None else fallback_indices.to(device).gather(1, kept_positions)

    # 2. the step
    out = hart_training_step(
        transformer, scheduler, codebook, context, context_mask, context_position_ids, teacher_forcing_input,
        last_scale_target, kept_positions, cond_dropped.to(device=device, dtype=torch.bool),
        randomness=TrainingRandomness(generator, B, device),
        sampling_randomness=TrainingRandomness(sampling_generator, B, device),
        last_scale_indices=ground_truth, diffusion_timesteps=diffusion_timesteps, diffusion_noise=diffusion_noise,
    )  # fmt: skip

    # 3. the fallback, reported on the host
    out.used_fallback_indices = bool(out.used_fallback_indices)
    if out.used_fallback_indices:
        if fallback_indices is None:
            raise FloatingPointError("non-finite last-scale logits; pass fallback_indices to train through them")
        warnings.warn(
            "non-finite last-scale logits: using the ground-truth indices to condition the diffusion head", stacklevel=2
        )
    return out


def token_targets(scale_indices: Sequence[torch.Tensor], last_scale_keep: torch.Tensor) -> torch.LongTensor:
    """Targets aligned with `HARTTrainingOutput.logits`: every scale's indices, the last one at the kept positions.

    Args:
        scale_indices (`Sequence[torch.LongTensor]`): (B, pn**2) ground-truth indices of every scale.
        last_scale_keep (`torch.Tensor`): The kept last-scale tokens of the step: their (B, kept) positions, ascending
            in every row, or the (B, pn_last**2) boolean keep mask (whose count is read on the host).
    """
    if last_scale_keep.dtype == torch.bool:
        last_scale_keep = last_scale_keep.nonzero()[:, 1].view(last_scale_keep.shape[0], -1)
    last = scale_indices[-1].gather(1, last_scale_keep.to(scale_indices[-1].device))
    return torch.cat([*scale_indices[:-1], last], dim=1)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean next-scale token cross-entropy over every position (the released code ships no training loop; this is
    the plain VAR-style loss)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), label_smoothing=label_smoothing
    )
