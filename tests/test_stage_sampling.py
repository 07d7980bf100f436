"""The two ways a stage draws its tokens (pipelines/hart/sampling.py): the original's on the CPU, and the fused
sampler's (inverse CDF of uniforms from the same token stream) on accelerators, run here through its torch reference."""

import pytest
import torch

from diffusers_hart.ops import sample_tokens_reference
from diffusers_hart.pipelines.hart.sampling import RandomStreams, sample_stage_tokens

V, C = 48, 4


def _stage(original_draws, more_smooth, seed=0, guidance_scale=2.0):
    logits = torch.randn(4, 5, V, generator=torch.Generator().manual_seed(100))  # 2 images, CFG halves
    codebook = torch.randn(V, C, generator=torch.Generator().manual_seed(101))
    streams = RandomStreams(torch.Generator().manual_seed(seed), 2, torch.device("cpu"))
    return sample_stage_tokens(logits, guidance_scale, 10, 0.9, 0.5, more_smooth, codebook, streams, original_draws)


@pytest.mark.parametrize("more_smooth", [False, True])
def test_fused_way_draws_what_the_sampler_reference_draws_from_the_token_stream(more_smooth):
    idx, vectors = _stage(original_draws=False, more_smooth=more_smooth)
    logits = torch.randn(4, 5, V, generator=torch.Generator().manual_seed(100))
    codebook = torch.randn(V, C, generator=torch.Generator().manual_seed(101))
    token_stream = RandomStreams(torch.Generator().manual_seed(0), 2, torch.device("cpu")).token_generators[0]
    uniform = torch.rand((2, 5), generator=token_stream)
    gumbel = -torch.empty(2, 5, V).exponential_(generator=token_stream).log() if more_smooth else None
    expected_idx, weights = sample_tokens_reference(
        logits, 10, 0.9, uniform, guidance_scale=2.0, gumbel_BlV=gumbel, smooth_scale=1.5,
        smooth_temperature=max(0.27 * (1 - 0.5 * 0.95), 0.005),
    )  # fmt: skip
    assert torch.equal(idx, expected_idx)
    torch.testing.assert_close(vectors, weights @ codebook if more_smooth else codebook[expected_idx], atol=0, rtol=0)


def test_both_ways_keep_to_the_filters_and_are_reproducible():
    mixed = 3.0 * torch.randn(4, 5, V, generator=torch.Generator().manual_seed(100))[:2]
    mixed -= 2.0 * torch.randn(4, 5, V, generator=torch.Generator().manual_seed(100))[2:]
    top10 = mixed.topk(10, dim=-1).indices
    for original_draws in (True, False):
        idx, _ = _stage(original_draws, more_smooth=False)
        assert (idx.unsqueeze(-1) == top10).any(-1).all()
        assert torch.equal(idx, _stage(original_draws, more_smooth=False)[0])
    draws = {tuple(_stage(False, False, seed=s)[0].flatten().tolist()) for s in range(5)}
    assert len(draws) > 1  # the seed reaches the fused way's draws
