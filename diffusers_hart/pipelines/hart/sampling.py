"""Token sampling for HART: top-k/top-p filtering, multinomial draws, gumbel-smoothed token maps.

Randomness follows the original's protocol so a seed reproduces its images: token draws
(multinomial, gumbel noise) come from one stream and the residual-diffusion noise from a
second stream seeded with the same seed. `RandomStreams` builds both from what the user
passes: one generator (batched draws, as the original) or one generator per image
(per-image draws, so an image does not depend on what else is in the batch).

Where the draws happen: on a generator's own device when the pipeline runs there (a CPU generator on
the CPU reproduces the original bit for bit). A generator on another device than the pipeline's (the
diffusers habit of a CPU generator for a CUDA pipeline) only seeds generators on the pipeline's
device: copying every stage's (B, l, V) probabilities to the host for the draws made a CUDA pipeline
up to 8x slower. On CUDA a seed is therefore reproducible on CUDA, with CUDA's random numbers.

How tokens are drawn: on the CPU as the original does (`torch.multinomial` of the filtered probabilities, then
gumbel noise for "more smooth"), which keeps the golden parity bit-exact. On an accelerator, by `ops.sample_tokens`:
per stage one uniform per token (`RandomStreams.uniform`), then the gumbel noise, both from the token stream, and an
inverse-CDF draw in one fused kernel with CFG mixing and filtering. It has the multinomial's distribution, not its
random numbers: a seed gives the same images on the same kind of device, not the same as on the CPU.
"""

import copy
from typing import List, Optional, Sequence, Tuple, Union

import torch

from ...ops import cfg_mix, sample_tokens, smooth_weights, top_k_top_p_filter

GeneratorArg = Optional[Union[torch.Generator, List[torch.Generator]]]


def _is_fresh(generator: torch.Generator) -> bool:
    """Whether `generator` is in the state `manual_seed(generator.initial_seed())` left it."""
    fresh = torch.Generator(generator.device).manual_seed(generator.initial_seed())
    return torch.equal(fresh.get_state(), generator.get_state())


def _draw_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


def stream_seeds(generator: torch.Generator, draws_tokens_itself: bool) -> Tuple[Optional[int], int]:
    """Seeds of the token stream (`None`: `generator` draws the tokens itself) and of the residual-noise stream.

    While the generator is fresh, both are its seed, as in the original, which seeds its global RNG and its model
    generator with the same number. Once it has been drawn from (a generator reused across calls), the seeds are drawn
    from it, so that tokens and noise move on from call to call.
    """
    if _is_fresh(generator):
        seed = generator.initial_seed()
        return (None if draws_tokens_itself else seed), seed
    token_seed = None if draws_tokens_itself else _draw_seed(generator)
    return token_seed, _draw_seed(generator)


class RandomStreams:
    def __init__(self, generator: GeneratorArg, num_images: int, device: torch.device):
        device = torch.device(device)
        if generator is None:
            # seed from the global RNG so torch.manual_seed() still makes runs repeatable
            generator = torch.Generator(device).manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        self.per_image = isinstance(generator, (list, tuple))
        given = list(generator) if self.per_image else [generator]
        if self.per_image and len(given) != num_images:
            raise ValueError(
                f"You passed a list of {len(given)} generators but the batch has {num_images} images "
                "(prompts x num_images_per_prompt); pass one generator per image or a single generator."
            )
        self.token_generators, self.noise_generators = [], []
        for g in given:
            # "cuda" and "cuda:0" are one device: compare the devices tensors actually land on
            on_device = torch.empty(0, device=g.device).device == torch.empty(0, device=device).device
            token_seed, noise_seed = stream_seeds(g, draws_tokens_itself=on_device)
            draw_device = g.device if on_device else device
            self.token_generators.append(g if on_device else torch.Generator(draw_device).manual_seed(token_seed))
            self.noise_generators.append(torch.Generator(draw_device).manual_seed(noise_seed))
        self.device = device

    def select(self, rows: slice) -> "RandomStreams":
        """The streams of the images `rows` (a micro-batch): their own generators when every image has some; with one
        generator for the whole batch, that one, which consecutive micro-batches then draw from one after the other."""
        if not self.per_image or rows == slice(0, len(self.token_generators)):
            return self
        view = copy.copy(self)
        view.token_generators = self.token_generators[rows]
        view.noise_generators = self.noise_generators[rows]
        return view

    @staticmethod
    def _on(generator: torch.Generator, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(generator.device) if tensor.device != generator.device else tensor

    def multinomial(self, probs_BlV: torch.Tensor) -> torch.LongTensor:
        """One token per row of (B, l, V) probabilities."""
        B, l, V = probs_BlV.shape
        if not self.per_image:
            g = self.token_generators[0]
            idx = torch.multinomial(self._on(g, probs_BlV).view(-1, V), 1, replacement=True, generator=g)
            return idx.view(B, l).to(probs_BlV.device)
        rows = [
            torch.multinomial(self._on(g, probs_BlV[i]), 1, replacement=True, generator=g).view(1, l)
            for i, g in enumerate(self.token_generators)
        ]
        return torch.cat(rows).to(probs_BlV.device)

    def uniform(self, num_images: int, num_tokens: int) -> torch.Tensor:
        """(num_images, num_tokens) float32 uniforms in [0, 1) from the token streams, on the pipeline's device:
        one draw with one generator, one row per generator otherwise."""
        if not self.per_image:
            g = self.token_generators[0]
            return torch.rand((num_images, num_tokens), generator=g, device=g.device).to(self.device)
        rows = [torch.rand((1, num_tokens), generator=g, device=g.device) for g in self.token_generators]
        return torch.cat(rows).to(self.device)

    def gumbel(self, like_BlV: torch.Tensor) -> torch.Tensor:
        """Standard Gumbel noise `-log(Exp(1))` shaped like `like_BlV`."""
        if not self.per_image:
            draws = [like_BlV]
        else:
            draws = list(like_BlV.split(1))
        noise = [
            -torch.empty(d.shape, dtype=d.dtype, device=g.device).exponential_(generator=g).log()
            for d, g in zip(draws, self.token_generators)
        ]
        return torch.cat(noise).to(like_BlV.device)

    def randn(self, num_images: int, rows_per_image: int, channels: int, copies: int, dtype) -> torch.Tensor:
        """Gaussian noise for `copies` CFG halves of `num_images * rows_per_image` rows: (copies * N, channels).

        With one generator this is a single draw of that shape (the original's order); per image,
        each generator draws its own rows of every half.
        """
        if not self.per_image:
            g = self.noise_generators[0]
            shape = (copies * num_images * rows_per_image, channels)
            return torch.randn(shape, generator=g, device=g.device, dtype=dtype).to(self.device)
        per_image = [
            torch.randn((copies, rows_per_image, channels), generator=g, device=g.device, dtype=dtype).to(self.device)
            for g in self.noise_generators
        ]
        return torch.stack(per_image, dim=1).reshape(copies * num_images * rows_per_image, channels)


def default_top_k(stage_index: int) -> int:
    """The original's fixed top-k: 600 for the first seven scales, 300 after."""
    return 600 if stage_index < 7 else 300


def smooth_temperature(ratio: float) -> float:
    """The original's gumbel-softmax temperature at a stage's guidance ratio (MaskGIT's schedule)."""
    return max(0.27 * (1 - ratio * 0.95), 0.005)


def smooth_token_vectors(
    filtered_logits_BlV: torch.Tensor, ratio: float, codebook_VC: torch.Tensor, streams: RandomStreams
) -> torch.Tensor:
    """Gumbel-softmax mixture of code vectors ("more smooth" sampling), with the original's temperature schedule."""
    gumbel = streams.gumbel(filtered_logits_BlV)
    weights = smooth_weights(filtered_logits_BlV, gumbel, 1 + ratio, smooth_temperature(ratio))
    return weights @ codebook_VC.to(weights.dtype).unsqueeze(0)


def sample_stage_tokens(
    logits: torch.Tensor,
    guidance_scale: Optional[float],
    top_k: int,
    top_p: float,
    ratio: float,
    more_smooth: bool,
    codebook_VC: torch.Tensor,
    streams: RandomStreams,
    original_draws: bool,
) -> Tuple[torch.LongTensor, torch.Tensor]:
    """One stage's tokens: indices (B, l) and the vectors fed on (B, l, C), code vectors or gumbel mixtures.

    `logits` are (B, l, V), or (2B, l, V) conditional then unconditional rows mixed with `guidance_scale`. See the
    module docstring for the two ways of drawing: `original_draws` (the pipeline's choice on the CPU) or the fused one.
    """
    if original_draws:
        if guidance_scale is not None:
            logits = cfg_mix(logits, guidance_scale)
        filtered = top_k_top_p_filter(logits, top_k, top_p)
        idx_Bl = streams.multinomial(filtered.softmax(dim=-1))
        if more_smooth:
            return idx_Bl, smooth_token_vectors(filtered, ratio, codebook_VC, streams)
        return idx_Bl, codebook_VC[idx_Bl]
    rows, num_tokens, vocab = logits.shape
    B = rows // 2 if guidance_scale is not None else rows
    uniform = streams.uniform(B, num_tokens)
    gumbel = streams.gumbel(logits.new_empty(B, num_tokens, vocab)) if more_smooth else None
    idx_Bl, weights = sample_tokens(
        logits, top_k, top_p, uniform, guidance_scale=guidance_scale, gumbel_BlV=gumbel,
        smooth_scale=1 + ratio, smooth_temperature=smooth_temperature(ratio),
    )  # fmt: skip
    if more_smooth:
        return idx_Bl, weights @ codebook_VC.to(weights.dtype).unsqueeze(0)
    return idx_Bl, codebook_VC[idx_Bl]


def guidance_ratios(num_stages: int) -> Sequence[float]:
    """Per-stage fraction of the guidance scale: si / (SN - 1), the last stage reusing the one before it."""
    return [min(si, num_stages - 2) / (num_stages - 1) for si in range(num_stages)]
